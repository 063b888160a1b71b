"""Two-phase BERT pretraining with LEGW + LAMB: the ``legw-hf pretrain`` program, as a script.

    python examples/pretrain_bert.py                          # tiny BERT, embedded corpus, 2 CPU cores, < 10 min
    python examples/pretrain_bert.py --help                   # every Trainer flag, plus the program's

See legw_hf/pretraining/program.py for what it does and docs/tutorial/pretrain-bert.md for the flags and recipes.
"""

from legw_hf import exit_process
from legw_hf.pretraining import main

if __name__ == "__main__":
    exit_process(main())
