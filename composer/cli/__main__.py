"""`python -m composer.cli ...`: what `torchrun` and `accelerate launch -m composer.cli` run on every rank."""

from composer.cli import main

main()
