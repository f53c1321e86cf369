"""Distilcast's training package (teachers, students, export).

Importing it sets OpenMP's wait policy to ``PASSIVE`` unless the environment already chose one
(libgomp reads it once, when torch loads, so it must be set before ``import torch``). With the
default active policy each idle intra-op thread spins for a while after every parallel region; on
a shared machine (2 cores, other jobs) the spinning thread takes the core the other thread needs,
and a PatchTST training step with 2 threads took 2.3x as long as with 1. Passive waiting removes
that (``bench/train_speed.py`` measures the loop). Set ``OMP_WAIT_POLICY=ACTIVE`` to restore it.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
