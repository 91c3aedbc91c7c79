"""`CausalLM`: runs requests (see `eval.requests`) on any `AutoModelForCausalLM` and its tokenizer.

Works the same on a model loaded from a folder and on the live model of a training run:

    lm = CausalLM(model, tokenizer, batch_size=16)
    lm.loglikelihood([Loglikelihood("The capital of France is", " Paris")])   # [(logprob, is_greedy)]
    lm.loglikelihood_rolling([LoglikelihoodRolling(text)])                    # [RollingResult]
    lm.generate_until([GenerateUntil("Q: 2+2=\nA:", until=("\n",), max_gen_toks=8)])

Batches are length-sorted (longest first, so an out-of-memory error comes at once and padding stays
small). Scoring batches are padded on the right without an attention mask: in a causal model a real
token never sees a later (padding) position, so its logits are those of the unpadded sequence.
Generation pads on the left with an attention mask, as `generate()` expects.

Under torch.distributed (world size > 1) every rank must call the same method with the same requests:
each rank runs a strided share (padded to equal length, so ZeRO-3's collective forwards stay in step)
and the results are gathered to every rank in the original order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .requests import (
    GenerateUntil,
    Loglikelihood,
    LoglikelihoodRolling,
    RollingResult,
    ScoreItem,
    cut_at_stop,
    encode,
    loglikelihood_item,
    prefix_token_id,
    rolling_windows,
    truncate_for_model,
)

DEFAULT_MAX_LENGTH = 2048


def model_max_length(model, tokenizer=None, default: int = DEFAULT_MAX_LENGTH) -> int:
    """The context length from the config (n_positions, max_position_embeddings, n_ctx), else the
    tokenizer's model_max_length when it is set to something real, else `default`."""
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
        return tok_max
    return default


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def run_sharded(items: Sequence, fn: Callable[[list], list]) -> list:
    """fn over this rank's share of items, results gathered to all ranks in the original order."""
    rank, world = dist_info()
    if world == 1:
        return fn(list(items))
    per_rank = math.ceil(len(items) / world)
    mine = list(items[rank::world])
    n_real = len(mine)
    if items:  # equal counts on every rank: pad with copies of the first item, dropped after
        mine += [items[0]] * (per_rank - n_real)
    results = fn(mine)[:n_real]
    gathered: list = [None] * world
    torch.distributed.all_gather_object(gathered, results)
    out = [None] * len(items)
    for r, rank_results in enumerate(gathered):
        for j, value in enumerate(rank_results):
            out[r + j * world] = value
    return out


def _stop_strings_criteria():
    from transformers import StoppingCriteria

    class StopStrings(StoppingCriteria):
        """Per row: done once the text generated after `prompt_width` contains one of that row's stop strings."""

        def __init__(self, tokenizer, prompt_width: int, stops: list[list[str]]):
            self.tokenizer, self.prompt_width, self.stops = tokenizer, prompt_width, stops

        def __call__(self, ids, scores, **kwargs) -> torch.Tensor:
            texts = self.tokenizer.batch_decode(ids[:, self.prompt_width :], skip_special_tokens=False)
            done = [any(s and s in t for s in row_stops) for t, row_stops in zip(texts, self.stops)]
            return torch.tensor(done, device=ids.device)

    return StopStrings


class CausalLM:
    def __init__(
        self,
        model,
        tokenizer,
        batch_size: int = 8,
        max_length: int | None = None,
        show_progress: bool = True,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or model_max_length(model, tokenizer)
        self.show_progress = show_progress
        self.prefix_token_id = prefix_token_id(tokenizer)
        # any id the embedding accepts will do for right padding: padded positions are never read
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_token_id is None:
            self.pad_token_id = 0

    @property
    def device(self) -> torch.device:
        """Where inputs go: the model's device, or for a model dispatched with a device_map (accelerate),
        the device of its first placed module (offloaded weights live on "meta"; inputs then stay on CPU)."""
        device_map = getattr(self.model, "hf_device_map", None)
        if device_map:
            first = next(iter(device_map.values()))
            return torch.device("cuda", first) if isinstance(first, int) else torch.device(
                first if first not in ("disk", "meta") else "cpu")
        return next(self.model.parameters()).device

    def _progress(self, total: int, desc: str):
        from tqdm.auto import tqdm

        rank, _ = dist_info()
        return tqdm(total=total, desc=desc, disable=not self.show_progress or rank != 0, leave=False)

    # ---------------------------------------------------------------- scoring

    @torch.no_grad()
    def score_items(self, items: Sequence[ScoreItem], desc: str = "scoring") -> list[tuple[float, bool, list[float]]]:
        """(sum of target log-probs, greedy match, per-target log-probs) for each item, in input order."""
        return run_sharded(items, lambda mine: self._score_local(mine, desc))

    def _score_local(self, items: list[ScoreItem], desc: str) -> list[tuple[float, bool, list[float]]]:
        prepared = [truncate_for_model(item, self.max_length) for item in items]
        order = sorted(range(len(items)), key=lambda i: -len(prepared[i][0]))  # longest first
        results: list = [None] * len(items)
        was_training = self.model.training
        self.model.eval()
        progress = self._progress(len(items), desc)
        try:
            for start in range(0, len(order), self.batch_size):
                batch_idx = order[start : start + self.batch_size]
                width = len(prepared[batch_idx[0]][0])
                input_ids = torch.full((len(batch_idx), width), self.pad_token_id, dtype=torch.long)  # [B, T]
                for row, i in enumerate(batch_idx):
                    inputs = prepared[i][0]
                    input_ids[row, : len(inputs)] = torch.tensor(inputs)
                logits = self.model(input_ids=input_ids.to(self.device), use_cache=False).logits  # [B, T, V]
                for row, i in enumerate(batch_idx):
                    inputs, targets = prepared[i]
                    n, k = len(inputs), len(targets)
                    # positions n-k .. n-1 predict the k targets
                    logprobs = F.log_softmax(logits[row, n - k : n].float(), dim=-1)  # [k, V]
                    target_ids = torch.tensor(targets, device=logprobs.device)
                    token_lp = logprobs.gather(-1, target_ids[:, None])[:, 0]  # [k]
                    greedy = bool((logprobs.argmax(-1) == target_ids).all())
                    results[i] = (float(token_lp.sum()), greedy, token_lp.tolist())
                progress.update(len(batch_idx))
        finally:
            progress.close()
            self.model.train(was_training)
        return results

    def loglikelihood(self, requests: Sequence[Loglikelihood]) -> list[tuple[float, bool]]:
        items = [loglikelihood_item(self.tokenizer, r) for r in requests]
        return [(lp, greedy) for lp, greedy, _ in self.score_items(items, desc="loglikelihood")]

    def loglikelihood_rolling(
        self, requests: Sequence[LoglikelihoodRolling], stride: int | None = None
    ) -> list[RollingResult]:
        per_request = []
        for r in requests:
            tokens = encode(self.tokenizer, r.text)
            per_request.append((len(tokens), rolling_windows(tokens, self.prefix_token_id, self.max_length, stride)))
        flat = [w for _, windows in per_request for w in windows]
        scores = self.score_items(flat, desc="loglikelihood_rolling")
        out, pos = [], 0
        for n_tokens, windows in per_request:
            logprob = sum(scores[pos + j][0] for j in range(len(windows)))
            out.append(RollingResult(logprob, n_tokens, windows))
            pos += len(windows)
        return out

    # ---------------------------------------------------------------- generation

    @torch.no_grad()
    def generate_until(self, requests: Sequence[GenerateUntil]) -> list[str]:
        return run_sharded(list(requests), self._generate_local)

    def _generate_local(self, requests: list[GenerateUntil]) -> list[str]:
        from transformers import StoppingCriteriaList

        StopStrings = _stop_strings_criteria()
        tokenizer = self.tokenizer
        eos_text = tokenizer.decode([tokenizer.eos_token_id]) if tokenizer.eos_token_id is not None else None
        encoded = []
        for r in requests:
            if r.max_gen_toks >= self.max_length:
                raise ValueError(f"max_gen_toks={r.max_gen_toks} leaves no room for context in {self.max_length}")
            ids = encode(tokenizer, r.context)[-(self.max_length - r.max_gen_toks) :]  # keep the end of the context
            encoded.append(ids if ids else [self.prefix_token_id])
        order = sorted(range(len(requests)), key=lambda i: -len(encoded[i]))
        results: list = [None] * len(requests)
        _, world = dist_info()
        was_training = self.model.training
        self.model.eval()
        progress = self._progress(len(requests), "generate_until")
        try:
            for start in range(0, len(order), self.batch_size):
                batch_idx = order[start : start + self.batch_size]
                width = len(encoded[batch_idx[0]])
                input_ids = torch.full((len(batch_idx), width), self.pad_token_id, dtype=torch.long)  # [B, T]
                attention_mask = torch.zeros((len(batch_idx), width), dtype=torch.long)
                for row, i in enumerate(batch_idx):  # left padding: generation continues at the right edge
                    ids = encoded[i]
                    input_ids[row, width - len(ids) :] = torch.tensor(ids)
                    attention_mask[row, width - len(ids) :] = 1
                stops = [list(requests[i].until) + ([eos_text] if eos_text else []) for i in batch_idx]

                out = self.model.generate(
                    input_ids=input_ids.to(self.device),
                    attention_mask=attention_mask.to(self.device),
                    max_new_tokens=max(requests[i].max_gen_toks for i in batch_idx),
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=self.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    stopping_criteria=StoppingCriteriaList([StopStrings(tokenizer, width, stops)]),
                    synced_gpus=world > 1,  # ranks that finish early keep stepping with the others (ZeRO-3)
                )  # [B, width + new]
                for row, i in enumerate(batch_idx):
                    new_tokens = out[row, width : width + requests[i].max_gen_toks].tolist()
                    if tokenizer.eos_token_id in new_tokens:  # what follows eos is padding
                        new_tokens = new_tokens[: new_tokens.index(tokenizer.eos_token_id)]
                    text = tokenizer.decode(new_tokens, skip_special_tokens=True)
                    results[i] = cut_at_stop(text, stops[row])
                progress.update(len(batch_idx))
        finally:
            progress.close()
            self.model.train(was_training)
        return results
