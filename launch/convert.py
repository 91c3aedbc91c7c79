"""Convert existing checkpoints into seedlm model folders, so users can continue pretraining them.

qwen3_moe: transformers' Qwen3-MoE is the gated-MoE family with attn_output_gate="none" and the same
parameter names; the conversion checks the source for features we do not have, loads it with transformers
(which also reads older per-expert checkpoints into the fused 3-D expert layout), copies the weights,
verifies the logits on random tokens, and saves a GatedMoeForCausalLM folder with its tokenizer.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from seedlm.launch.export import use_umask_file_modes

logger = logging.getLogger(__name__)

SUPPORTED_SOURCES = ("qwen3_moe",)

# Qwen3-MoE config fields that carry over unchanged
QWEN3_MOE_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "max_position_embeddings", "initializer_range", "rms_norm_eps", "tie_word_embeddings",
    "attention_bias", "attention_dropout", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
    "norm_topk_prob", "router_aux_loss_coef", "bos_token_id", "eos_token_id", "pad_token_id", "rope_parameters",
)


class ConversionError(ValueError):
    """The source checkpoint cannot be converted; the message says why and what to do."""


SEEDLM_MODEL_TYPES = ("seedlm_gated_moe", "seedlm_deltaproduct")


def read_source_config(src_dir: Path, source: str) -> dict:
    """The source folder's config.json, after checking that the folder holds a `source` checkpoint with weights."""
    if source not in SUPPORTED_SOURCES:
        raise ConversionError(f"--from {source!r} is not supported; supported sources: {list(SUPPORTED_SOURCES)}")
    if not src_dir.is_dir():
        raise ConversionError(f"{src_dir} does not exist: pass the folder of a {source} checkpoint")
    config_path = src_dir / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{src_dir} has no config.json: pass a transformers checkpoint folder")
    config = json.loads(config_path.read_text())
    model_type = config.get("model_type")
    if model_type in SEEDLM_MODEL_TYPES:
        raise ConversionError(
            f"{src_dir} is already a seedlm model ({model_type!r}) and needs no conversion: load it as it is with "
            f"AutoModelForCausalLM.from_pretrained (trust_remote_code=True where seedlm is not installed), or "
            f"continue pretraining it with train.init_from={src_dir}"
        )
    if model_type != source:
        raise ConversionError(
            f"{src_dir} holds a {model_type!r} checkpoint, not {source!r}; seedlm convert reads only "
            f"{list(SUPPORTED_SOURCES)} checkpoints"
        )
    if not any(src_dir.glob("*.safetensors")) and not any(src_dir.glob("pytorch_model*.bin")):
        raise ConversionError(
            f"{src_dir} has a config.json but no weights (*.safetensors or pytorch_model*.bin): copy or download "
            f"the checkpoint's weight files into that folder"
        )
    return config


def check_qwen3_moe_supported(config) -> None:
    """Raise ConversionError naming every feature of the source the gated-MoE family cannot represent."""
    problems = []
    if config.use_sliding_window:
        problems.append("use_sliding_window=true (sliding-window attention is not implemented)")
    if config.mlp_only_layers:
        problems.append(f"mlp_only_layers={config.mlp_only_layers} (every layer must be MoE)")
    if config.num_experts > 0 and config.decoder_sparse_step != 1:
        problems.append(f"decoder_sparse_step={config.decoder_sparse_step} (every layer must be MoE)")
    if config.hidden_act != "silu":
        problems.append(f"hidden_act={config.hidden_act!r} (only SwiGLU 'silu' experts)")
    if problems:
        raise ConversionError("cannot convert this Qwen3-MoE checkpoint: " + "; ".join(problems))


def gated_moe_config_from_qwen3_moe(config):
    from seedlm.model import GatedMoeConfig

    fields = {name: getattr(config, name) for name in QWEN3_MOE_FIELDS if hasattr(config, name)}
    fields["rope_parameters"] = dict(fields.get("rope_parameters") or {})
    fields["rope_theta"] = fields["rope_parameters"].get("rope_theta", 10000.0)
    return GatedMoeConfig(
        **fields,
        attn_output_gate="none",
        qk_norm=True,
        shared_expert_intermediate_size=0,
        router_z_loss_coef=0.0,
        hidden_act="silu",
    )


@torch.no_grad()
def gated_moe_from_qwen3_moe(source):
    """A GatedMoeForCausalLM holding a loaded Qwen3MoeForCausalLM's weights (same parameter names)."""
    from seedlm.model import GatedMoeForCausalLM

    config = gated_moe_config_from_qwen3_moe(source.config)
    target = GatedMoeForCausalLM(config).to(source.dtype).eval()
    state = source.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = target.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ConversionError(f"weights do not line up: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        target.tie_weights()
    return target


@torch.no_grad()
def convert_qwen3_moe(src_dir: str | Path, out_dir: str | Path, verify_tokens: int = 16) -> Path:
    """Convert a Qwen3-MoE folder into a GatedMoeForCausalLM folder; returns the output folder.

    verify_tokens > 0 runs both models on that many random tokens and requires equal logits."""
    from transformers import AutoTokenizer, GenerationConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    read_source_config(src_dir, "qwen3_moe")
    source_config = Qwen3MoeConfig.from_pretrained(src_dir)
    check_qwen3_moe_supported(source_config)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConversionError(f"{out_dir} exists and is not empty; choose a new output folder")

    logger.info("loading %s with transformers", src_dir)
    source = Qwen3MoeForCausalLM.from_pretrained(src_dir, dtype="auto").eval()
    target = gated_moe_from_qwen3_moe(source)

    if verify_tokens > 0:
        ids = torch.randint(0, target.config.vocab_size, (1, verify_tokens), generator=torch.Generator().manual_seed(0))
        expected, got = source(ids).logits.float(), target(ids).logits.float()
        error = (expected - got).abs().max().item()
        tolerance = 1e-4 if source.dtype == torch.float32 else 5e-2
        if error > tolerance:
            raise ConversionError(f"converted logits differ from the source by {error:.3g} (> {tolerance})")
        logger.info("verified: max |logit difference| %.3g on %d tokens", error, verify_tokens)

    out_dir.mkdir(parents=True, exist_ok=True)
    target.save_pretrained(out_dir)
    try:
        GenerationConfig.from_pretrained(src_dir).save_pretrained(out_dir)
    except OSError:
        pass  # the source has no generation_config.json
    try:
        AutoTokenizer.from_pretrained(src_dir).save_pretrained(out_dir)
    except (OSError, ValueError):
        logger.warning("%s has no tokenizer; the converted folder has none either", src_dir)
    readme = src_dir / "README.md"
    if readme.is_file():
        shutil.copy(readme, out_dir / "SOURCE_README.md")
    use_umask_file_modes(out_dir)
    return out_dir
