"""What the trainer trains on: text through the data pipeline, or a generated task (data.synthetic).

Both kinds answer the same calls, so the training loop has no branch for either:
    data.config                         data_pipeline.DataConfig (batch shape, seq_len, sources)
    data.check(run, output_dir)         run-level mistakes, before any compute
    data.prepare_tokenizer(output_dir, dist) -> (tokenizer, folder)
    data.train_loader(tokenizer, dist, grad_accum_steps) / data.validation_loader(tokenizer, dist)
    data.evaluate(model) -> dict        metrics of the data's own task at each evaluation ({} for text)
    data.final_report(model, step)      a closing evaluation row, or None; with summary_line / write_report
"""

from __future__ import annotations

import logging
from pathlib import Path

from seedlm.launch.distributed import DistInfo, barrier

logger = logging.getLogger("seedlm.train")


class TextData:
    """Text sources -> sentencepiece tokenizer (trained on the run's sources when none is given) -> packing."""

    def __init__(self, run):
        from seedlm.data_pipeline import DataConfig

        self.run = run
        self.config = DataConfig.from_dict(run.data)

    def check(self, run, output_dir: Path) -> None:
        """Text runs have nothing beyond DataConfig's and the run config's own checks."""

    def prepare_tokenizer(self, output_dir: Path, dist: DistInfo):
        """An existing tokenizer folder, or one trained (on rank 0) from the run's training sources."""
        from seedlm.data_pipeline import iter_texts, load_tokenizer, open_sources, train_tokenizer

        tok = self.run.tokenizer
        if tok.path:
            return load_tokenizer(tok.path), Path(tok.path)
        tok_dir = output_dir / "tokenizer"
        if dist.is_main and not (tok_dir / "tokenizer_config.json").is_file():
            logger.info("training a %d-token %s tokenizer into %s", tok.vocab_size, tok.model_type, tok_dir)
            texts = iter_texts(open_sources(self.config, "train"), seed=self.config.seed)
            train_tokenizer(texts, tok_dir, vocab_size=tok.vocab_size, model_type=tok.model_type,
                            max_chars=tok.max_chars, max_docs=tok.max_docs, show_progress=self.run.train.progress_bar)
        barrier()
        return load_tokenizer(tok_dir), tok_dir

    def train_loader(self, tokenizer, dist: DistInfo, grad_accum_steps: int):
        from seedlm.data_pipeline import build_dataloader

        return build_dataloader(self.config, tokenizer, dist.rank, dist.world_size)

    def validation_loader(self, tokenizer, dist: DistInfo):
        from seedlm.data_pipeline import build_dataloader

        return build_dataloader(self.config, tokenizer, dist.rank, dist.world_size, split="validation")

    def evaluate(self, model) -> dict:
        return {}

    def final_report(self, model, step: int) -> dict | None:
        return None


def training_data(run):
    """TextData, or the generated task of data.synthetic (launch/synthetic.py), for the run config."""
    from seedlm.launch.synthetic import synthetic_run

    return synthetic_run(run) or TextData(run)
