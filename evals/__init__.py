"""Uses of a run's checkpoints outside training, among them

* ``export``   ``yoto export``: a checkpoint as a Hugging Face ``transformers`` model
               (config.json + model.safetensors) with the run's tokenizer beside it.
* ``harness``  the lm-evaluation-harness model ``yoto`` (a checkpoint, its tokenizer).
* ``tasks``    offline few-shot tasks built from held-out text on the machine.
* ``evaluate`` ``yoto eval``: lm-eval on a checkpoint, results into the run's evals/.

Beside ``yoto.scaling.sweep`` in the layers: may import the trainer; only the CLI imports
this package. Importing the package imports none of its modules (``transformers`` loads
only when an export or an evaluation runs).
"""
