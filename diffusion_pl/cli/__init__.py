"""The `diffusion-pl` command: front ends only; every command parses arguments and calls the library.

    main.py              the dispatcher (`diffusion-pl <command>`)
    fit.py               LightningCLI's fit / validate / test / predict (DiffusionCLI)
    run_folder.py        one run per run folder
    common.py            what the commands share: the parser (flag style), the one-line input error, flag names,
                         the model options
    reference.py         the generated command-line reference page, docs/reference/cli.md
    sampler_spec.py      the `--sampler` argument
    prepare.py, sample.py, evaluate.py, reconstruct_ema.py, export.py, import_model.py: one command each
"""
