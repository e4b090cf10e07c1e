"""Scaling laws for yoto runs: fits, the runs they read, and sweeps that train the runs.

* ``laws``  the fits (Kaplan L(N), Chinchilla L(N, D)), effective sizes and C ≈ 6·N·D:
            numpy and scipy only;
* ``runs``  scaling points from run directories (the run store) or a CSV table, and the
            fit report; reads only the kernel, so the explorer shares it with the CLI;
* ``sweep`` ``yoto sweep``: a grid of ordinary training runs; the one module here that
            runs the trainer (and so imports torch).

Importing this package imports none of them, so a reader of the fits never pays for the
trainer.
"""
