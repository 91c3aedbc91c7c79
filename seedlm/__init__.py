"""seedlm: a pretraining stack for gated-attention MoE and DeltaProduct language models.

`import seedlm` registers both model families with transformers' AutoConfig, AutoModel and
AutoModelForCausalLM. The subpackages:

    seedlm.model          HF configs, modeling code and kernels (flat files: exports carry them as remote code)
    seedlm.data_pipeline  sources -> tokenizer -> packing -> per-rank shards -> batches
    seedlm.launch         CLI, config, trainer, DeepSpeed engine, expert parallel, checkpoints, export
    seedlm.eval           evaluation harness, tasks, metrics, lm-eval adapter

In the repository they are the top-level folders model/, data_pipeline/, launch/ and eval/ (pyproject.toml maps
them into this package); an installed wheel holds them inside this folder.
"""

import os as _os

_here = _os.path.dirname(_os.path.abspath(__file__))
_checkout = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "model")) and _os.path.isfile(_os.path.join(_checkout, "pyproject.toml")):
    # a source checkout (editable install, tests): the subpackages are this folder's siblings
    __path__.append(_checkout)

from seedlm import model as _model  # noqa: E402,F401  (registers both families with the Auto classes)

__version__ = "0.1.0"
