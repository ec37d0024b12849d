"""`python -m diffusion_pl` is the `diffusion-pl` command."""

import sys

from diffusion_pl.cli import main

sys.exit(main())
