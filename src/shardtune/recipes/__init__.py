"""Recipes: each a script a user can read top to bottom (setup -> fit -> save) over the
library. sft.py is supervised fine-tuning."""
