"""`python -m diffusion_pl` is the `diffusion-pl` command."""

import sys

from diffusion_pl.cli.main import main

sys.exit(main())
