"""`python -m affectprep`, which is also how `accelerate launch -m affectprep train ...` starts every process."""
from affectprep.cli import main

main()
