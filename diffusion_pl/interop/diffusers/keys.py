"""One table of weight names per diffusers network, read in both directions: import (unet.py, dit.py) and export
(export.py) derive their renames from the same rows, so a layer added once is mapped both ways.

A row pairs a diffusers module path with ours, as templates whose `{field}`s stand for integers
(`down_blocks.{level}.resnets.{i}.norm1` <-> `enc.{level}.{i}.norm0`); the parameter name (weight, bias)
follows unchanged. Two layouts differ by more than a name, and a row says which:

- `part`: our layer is diffusers' layers stacked on dim 0. timm's Attention (ours) fuses q, k, v into one
  `qkv` layer whose rows are [q; k; v], diffusers keeps `to_q`, `to_k`, `to_v`: three rows with part 0, 1, 2.
  Import concatenates the parts, export splits ours in as many chunks.
- a field only in the diffusers template: diffusers holds one copy of our layer per value of that field
  (DiTTransformer2DModel's per-block `norm1.emb`, models/transformers/dit_transformer_2d.py). Import
  requires the copies to be equal and keeps one; export writes one copy per value the caller gives.

`alias` rows are older diffusers names of a layer (pre-0.13 attention names, DDPM's `Conv2d_0`): read on
import, never written.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion_pl.utils.errors import UserValueError

__all__ = ["KeyRow", "KeyTable", "UNET_KEYS", "UNET_BLOCK_LAYERS", "DIT_KEYS"]

_FIELD = re.compile(r"\{(\w+)\}")


def _compile(template: str) -> re.Pattern:
    pieces = _FIELD.split(template)  # literal, field, literal, field, ...
    return re.compile("".join(re.escape(p) if k % 2 == 0 else rf"(?P<{p}>\d+)" for k, p in enumerate(pieces)))


@dataclass(frozen=True)
class KeyRow:
    """diffusers module path <-> ours (templates), with the part of a fused layer and whether it is import-only."""

    theirs: str
    ours: str
    part: int | None = None
    alias: bool = False

    @property
    def copied(self) -> tuple[str, ...]:
        """Fields of the diffusers template only: diffusers holds one copy of our layer per value."""
        ours = set(_FIELD.findall(self.ours))
        return tuple(f for f in _FIELD.findall(self.theirs) if f not in ours)


class KeyTable:
    """The renames between a diffusers network's state dict and ours (see the module docstring)."""

    def __init__(self, network: str, rows: Iterable[KeyRow]) -> None:
        self.network, self.rows = network, tuple(rows)
        self._theirs = [(row, _compile(row.theirs)) for row in self.rows]
        self._ours = [(row, _compile(row.ours)) for row in self.rows if not row.alias]
        # how many parts each fused layer of ours has (written rows only: aliases repeat them)
        self._parts: dict[str, int] = {}
        for row in self.rows:
            if row.part is not None and not row.alias:
                self._parts[row.ours] = max(self._parts.get(row.ours, 0), row.part + 1)

    def to_ours(self, state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
        """(our state dict, the diffusers keys no row maps): parts concatenated, equal copies kept once."""
        out: dict[str, Tensor] = {}
        fused: dict[str, tuple[KeyRow, dict[int, Tensor]]] = {}
        copies: dict[str, tuple[KeyRow, list[tuple[tuple[int, ...], str, Tensor]]]] = {}
        unmatched = []
        for key, value in state_dict.items():
            module, _, kind = key.rpartition(".")
            hit = next(((row, m) for row, pattern in self._theirs if (m := pattern.fullmatch(module))), None)
            if hit is None:
                unmatched.append(key)
                continue
            row, match = hit
            name = f"{row.ours.format(**match.groupdict())}.{kind}"
            if row.part is not None:
                fused.setdefault(name, (row, {}))[1][row.part] = value
            elif row.copied:
                copies.setdefault(name, (row, []))[1].append((tuple(int(match[f]) for f in row.copied), key, value))
            else:
                out[name] = value
        for name, (row, parts) in fused.items():
            count = self._parts[row.ours]
            if sorted(parts) != list(range(count)):
                raise UserValueError(f"{self.network} weights hold {len(parts)} of the {count} parts of our fused "
                                     f"{name} (from {row.theirs}): expected all of its q, k, v layers")
            out[name] = torch.cat([parts[i] for i in range(count)], dim=0)  # [q; k; v] on dim 0
        for name, (row, found) in copies.items():
            out[name] = self._one_copy(name, row, found)
        return out, unmatched

    def _one_copy(self, name: str, row: KeyRow, found: list[tuple[tuple[int, ...], str, Tensor]]) -> Tensor:
        """The one tensor of diffusers' identical copies of our layer `name` (refused in one line if they differ)."""
        first, _, value = min(found, key=lambda item: item[0])
        for index, key, other in found:
            if not torch.equal(other, value):
                where = ", ".join(f"{f} {v}" for f, v in zip(row.copied, index))
                first_where = ", ".join(f"{f} {v}" for f, v in zip(row.copied, first))
                raise UserValueError(f"{self.network} {where}'s {key} differs from {first_where}'s: expected the "
                                     f"identical per-{row.copied[0]} copies of one layer (our {name}) of a "
                                     "converted model")
        return value

    def to_theirs(self, state_dict: Mapping[str, Tensor],
                  copies: Mapping[str, Iterable[int]] | None = None) -> tuple[dict[str, Tensor], list[str]]:
        """(diffusers state dict, our keys no row maps): fused layers split, copied layers written once per value
        of `copies[field]` (e.g. {"block": range(depth)})."""
        copies = {field: list(values) for field, values in (copies or {}).items()}
        out: dict[str, Tensor] = {}
        unmatched = []
        for key, value in state_dict.items():
            module, _, kind = key.rpartition(".")
            hits = [(row, m) for row, pattern in self._ours if (m := pattern.fullmatch(module))]
            if not hits:
                unmatched.append(key)
            for row, match in hits:
                missing = [field for field in row.copied if field not in copies]
                if missing:  # the caller's omission, not the user's input
                    raise ValueError(f"{row.ours} is copied per {missing[0]} in {self.network}: pass copies="
                                     f"{{{missing[0]!r}: range(...)}}")
                piece = value if row.part is None else value.chunk(self._parts[row.ours], dim=0)[row.part]
                for values in itertools.product(*(copies[field] for field in row.copied)):
                    fields = {**match.groupdict(), **dict(zip(row.copied, values))}
                    out[f"{row.theirs.format(**fields)}.{kind}"] = piece
        return out, unmatched


# -- diffusers UNet2DModel <-> UNet (diffusers models/unets/unet_2d.py, unet_2d_blocks.py) ------------------------

# the layers inside a DownBlock2D / AttnDownBlock2D / UNetMidBlock2D / UpBlock2D / AttnUpBlock2D, relative to
# the block: a ResnetBlock2D's (norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut) are a ResBlock's
# (norm0, conv0, affine.1, norm1, conv1, skip), and attention {i} follows resnet {i} (ResBlock {i}'s `.attn`)
UNET_BLOCK_LAYERS = (
    KeyRow("resnets.{i}.norm1", "{i}.norm0"), KeyRow("resnets.{i}.conv1", "{i}.conv0"),
    KeyRow("resnets.{i}.time_emb_proj", "{i}.affine.1"), KeyRow("resnets.{i}.norm2", "{i}.norm1"),
    KeyRow("resnets.{i}.conv2", "{i}.conv1"), KeyRow("resnets.{i}.conv_shortcut", "{i}.skip"),
    KeyRow("attentions.{i}.group_norm", "{i}.attn.norm"), KeyRow("attentions.{i}.to_out.0", "{i}.attn.attn.proj"),
    KeyRow("attentions.{i}.to_q", "{i}.attn.attn.qkv", part=0),
    KeyRow("attentions.{i}.to_k", "{i}.attn.attn.qkv", part=1),
    KeyRow("attentions.{i}.to_v", "{i}.attn.attn.qkv", part=2),
    # diffusers before 0.13 (query / key / value / proj_attn)
    KeyRow("attentions.{i}.proj_attn", "{i}.attn.attn.proj", alias=True),
    KeyRow("attentions.{i}.query", "{i}.attn.attn.qkv", part=0, alias=True),
    KeyRow("attentions.{i}.key", "{i}.attn.attn.qkv", part=1, alias=True),
    KeyRow("attentions.{i}.value", "{i}.attn.attn.qkv", part=2, alias=True),
)
_UNET_BLOCKS = (("down_blocks.{level}", "enc.{level}"), ("up_blocks.{level}", "dec.{level}"), ("mid_block", "mid"))

UNET_KEYS = KeyTable("diffusers UNet2DModel", (
    KeyRow("time_embedding.linear_1", "map_emb.0"), KeyRow("time_embedding.linear_2", "map_emb.2"),
    KeyRow("conv_in", "conv_in"), KeyRow("conv_norm_out", "norm_out"), KeyRow("conv_out", "conv_out"),
    # the strided conv that ends encoder level {level}, the upsampling conv that ends decoder level {level}
    KeyRow("down_blocks.{level}.downsamplers.0.conv", "downsample.{level}.conv"),
    KeyRow("up_blocks.{level}.upsamplers.0.conv", "upsample.{level}.conv"),
    KeyRow("down_blocks.{level}.downsamplers.0.Conv2d_0", "downsample.{level}.conv", alias=True),  # DDPM's TF name
    KeyRow("up_blocks.{level}.upsamplers.0.Conv2d_0", "upsample.{level}.conv", alias=True),
    *(KeyRow(f"{theirs}.{row.theirs}", f"{ours}.{row.ours}", row.part, row.alias)
      for theirs, ours in _UNET_BLOCKS for row in UNET_BLOCK_LAYERS),
))

# -- diffusers DiTTransformer2DModel <-> DiT (models/transformers/dit_transformer_2d.py) ---------------------------

DIT_KEYS = KeyTable("diffusers DiT", (
    KeyRow("pos_embed.proj", "x_embedder.proj"),
    # every block's norm1.emb holds a copy of the one timestep MLP and class table (CombinedTimestepLabelEmbeddings)
    KeyRow("transformer_blocks.{block}.norm1.emb.timestep_embedder.linear_1", "t_embedder.1.0"),
    KeyRow("transformer_blocks.{block}.norm1.emb.timestep_embedder.linear_2", "t_embedder.1.2"),
    KeyRow("transformer_blocks.{block}.norm1.emb.class_embedder.embedding_table", "y_embedder.table"),
    KeyRow("transformer_blocks.{block}.attn1.to_q", "blocks.{block}.attn.qkv", part=0),
    KeyRow("transformer_blocks.{block}.attn1.to_k", "blocks.{block}.attn.qkv", part=1),
    KeyRow("transformer_blocks.{block}.attn1.to_v", "blocks.{block}.attn.qkv", part=2),
    KeyRow("transformer_blocks.{block}.attn1.to_out.0", "blocks.{block}.attn.proj"),
    KeyRow("transformer_blocks.{block}.ff.net.0.proj", "blocks.{block}.mlp.fc1"),
    KeyRow("transformer_blocks.{block}.ff.net.2", "blocks.{block}.mlp.fc2"),
    KeyRow("transformer_blocks.{block}.norm1.linear", "blocks.{block}.adaLN_modulation.1"),
    KeyRow("proj_out_1", "final_layer.adaLN_modulation.1"),
    KeyRow("proj_out_2", "final_layer.linear"),
))
