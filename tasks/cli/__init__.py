"""The `tl` command (`main.py`) and the commands behind it. The top of the house: nothing imports it."""
