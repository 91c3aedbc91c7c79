"""lm-evaluation-harness model adapter "seedlm": evaluates a run folder's latest checkpoint (or any
exported folder) with lm-eval. Needs the `eval` extra (`pip install -e ".[eval]"`).

It lives in launch/ because it reads run folders, whose checkpoint layout launch/checkpoint.py owns (eval/
knows only model folders); the request splitting it adds is eval's (`seedlm.eval.requests.encode_pair`).

From Python (importing this module registers the adapter):

    import lm_eval, seedlm.launch.lm_eval_adapter
    lm_eval.simple_evaluate(model="seedlm", model_args="run_dir=runs/x", tasks=["tiny_qa"],
                            task_manager=lm_eval.tasks.TaskManager(include_path="eval/tasks"))

From the shell (lm_eval's own command line, with the adapter registered first):

    python -m seedlm.launch.lm_eval_adapter --model seedlm --model_args run_dir=runs/x \\
        --include_path eval/tasks --tasks tiny_qa

An exported folder also runs as `--model seedlm --model_args pretrained=DIR`. lm-eval's own
`--model hf --model_args pretrained=DIR,trust_remote_code=True` works too, except on a loglikelihood request
whose continuation merges with the end of the context into one piece (seedlm's tokenizers have pieces such as
"▁is▁a"): lm-eval's split leaves it no token and HFLM stops on an AssertionError. The "seedlm" model splits
such a pair before the merged piece (`seedlm.eval.requests.encode_pair`).
"""

from __future__ import annotations

try:
    import lm_eval.models  # noqa: F401 - fills the registry's lazy entries ("hf", ...) before ours is added
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "seedlm.launch.lm_eval_adapter needs lm-evaluation-harness: pip install -e '.[eval]' (or pip install lm-eval)"
    ) from err

from seedlm.eval.requests import encode_pair
from seedlm.launch.checkpoint import resolve_model_dir


@register_model("seedlm")
class SeedlmLM(HFLM):
    """HFLM on a seedlm run folder's latest complete checkpoint (`run_dir=`, as resume picks it) or a model
    folder (`pretrained=`). Other HFLM arguments (batch_size, device, dtype, max_length) pass through.
    """

    def __init__(self, run_dir: str | None = None, pretrained: str | None = None, **kwargs):
        if (run_dir is None) == (pretrained is None):
            raise ValueError("the seedlm lm-eval model takes exactly one of run_dir=RUN_FOLDER or pretrained=DIR")
        folder = str(resolve_model_dir(run_dir if run_dir is not None else pretrained))
        kwargs.setdefault("trust_remote_code", True)
        kwargs.setdefault("tokenizer", folder)
        super().__init__(pretrained=folder, **kwargs)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """seedlm's split (seedlm.eval.requests.encode_pair). lm-eval's own splits the joint encoding at the
        context's token count, which leaves no continuation token when a sentencepiece piece spans the
        boundary ("... is" + " a" -> "▁is▁a"), and HFLM then stops at `assert len(continuation_enc) > 0`."""
        return encode_pair(self.tokenizer, context, continuation, encode_fn=self.tok_encode)


def main() -> None:
    """lm_eval's command line with the "seedlm" model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
