"""seedlm data pipeline: text sources -> tokenizer -> packed rows -> per-rank, per-worker shards -> batches.

How the trainer uses it::

    from seedlm.data_pipeline import DataConfig, build_dataloader, load_tokenizer, check_vocab_fits

    cfg = DataConfig.from_dict(run_config["data"])            # unknown keys -> DataError
    tok = load_tokenizer(cfg.tokenizer)                         # a folder from `seedlm tokenizer train`
    check_vocab_fits(tok, model.config.vocab_size)              # before any compute
    train = build_dataloader(cfg, tok, rank, world_size)        # opens and checks every source now
    val = build_dataloader(cfg, tok, rank, world_size, split="validation")  # held-out data, one pass
    if resuming:
        train.load_state_dict(checkpoint["data"][rank])         # per-rank state, saved with the checkpoint
    for step, batch in zip(range(start, max_steps), train):    # training data repeats forever
        # batch["input_ids"], batch["labels"], batch["position_ids"]: [micro_batch_size, seq_len] int64
        # (position_ids restart at 0 where a document starts: the models keep documents apart by them)
        ...
        if saving:
            data_state = train.state_dict()                     # position after the last batch taken
        if logging:
            log(train.bad_record_counts())                      # skipped records by problem

The state is exact: a loader restored from `state_dict()` yields the same batches as the uninterrupted
one. It must be restored with the same world size, num_workers and data settings (else a DataError
names what changed). Labels are -100 at the first position of every segment (see `packing`). All
user mistakes about the data raise `DataError` with a message naming what is wrong and what to do.

Prepared data (`data.prepared`, see `prepared`): `seedlm data prepare` tokenises the sources once into
memory-mapped shards; `build_dataloader` then reads rows in a global order that is the same for every world size,
worker count and gradient accumulation, and its state (global rows consumed) resumes under any of them:

    prepare(cfg, "runs/tok", "data/prepared", num_proc=8)                  # or: seedlm data prepare CONFIG DIR
    cfg.prepared = [{"path": "data/prepared", "weight": 1.0}]              # data.prepared=data/prepared
    train = build_dataloader(cfg, tok, rank, world_size, grad_accum_steps=4)

Generated tasks (a run's `data.synthetic`) have the same loader interface: `SyntheticLoader` yields batches
whose targets are aligned with the inputs, over records from a generator the caller passes (see `synthetic`).
"""

from .config import DataConfig, DataError, SourceConfig, load_data_config
from .loader import PackedDataLoader, build_dataloader, open_sources
from .packing import make_batch, split_segments
from .prepared import PreparedLoader, prepare
from .sources import is_heldout, iter_texts, open_source
from .synthetic import SyntheticConfig, SyntheticLoader
from .tokenizer import check_vocab_fits, load_tokenizer, train_tokenizer

__all__ = [
    "DataConfig",
    "DataError",
    "PackedDataLoader",
    "PreparedLoader",
    "SourceConfig",
    "SyntheticConfig",
    "SyntheticLoader",
    "build_dataloader",
    "check_vocab_fits",
    "is_heldout",
    "iter_texts",
    "load_data_config",
    "load_tokenizer",
    "make_batch",
    "open_source",
    "open_sources",
    "prepare",
    "split_segments",
    "train_tokenizer",
]
