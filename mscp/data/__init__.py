"""Built-in prompt files (harmful_default.txt, benign_default.txt) and loaders of the prompt sets
that ship inside PyPI packages: see mscp.data.sets."""
from mscp.data.sets import (BENIGN_SETS, FILES, HARMFUL_SETS, SETS, Item, Labelled, dedupe, load, locate,  # noqa: F401
                            split, write_split)
