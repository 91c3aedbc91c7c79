"""`seedlm convert --from qwen3_moe`: same logits as transformers' Qwen3MoeForCausalLM, clear refusals."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from seedlm.launch.cli import main as seedlm
from seedlm.model import DeltaProductConfig, DeltaProductForCausalLM, GatedMoeForCausalLM
from tests.helpers import file_modes, load_with_every_auto_class_without_seedlm, reference_outputs, umask_set_to


def qwen3_moe_folder(path, **overrides):
    fields = dict(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
        max_position_embeddings=64, norm_topk_prob=True, tie_word_embeddings=False,
    )
    fields.update(overrides)
    torch.manual_seed(0)
    source = Qwen3MoeForCausalLM(Qwen3MoeConfig(**fields)).eval()
    with torch.no_grad():
        for name, param in source.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0, 0.5)  # transformers initialises routers to zero; spread them
            elif name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)  # non-trivial norm weights catch a misplaced norm
    source.save_pretrained(path)
    return source


@pytest.mark.parametrize("tied, norm_topk", [(False, True), (True, False)])
def test_converted_model_gives_qwen3_moe_logits(tmp_path, tied, norm_topk):
    source = qwen3_moe_folder(tmp_path / "qwen", tie_word_embeddings=tied, norm_topk_prob=norm_topk)
    assert seedlm(["convert", "--from", "qwen3_moe", str(tmp_path / "qwen"), str(tmp_path / "ours")]) == 0
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert type(converted) is GatedMoeForCausalLM
    assert converted.config.attn_output_gate == "none" and converted.config.tie_word_embeddings == tied
    ids = torch.randint(0, 101, (3, 13))
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, source(ids).logits, rtol=1e-5, atol=1e-5)
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["model_type"] == "seedlm_gated_moe" and "auto_map" in config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(use_sliding_window=True, sliding_window=16), "use_sliding_window"),
        (dict(mlp_only_layers=[1]), "mlp_only_layers"),
        (dict(hidden_act="gelu"), "hidden_act"),
    ],
)
def test_unsupported_qwen3_moe_features_are_refused(tmp_path, capsys, overrides, message):
    qwen3_moe_folder(tmp_path / "qwen", **overrides)
    assert seedlm(["convert", "--from", "qwen3_moe", str(tmp_path / "qwen"), str(tmp_path / "ours")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "ours").exists()


def test_converted_folder_loads_with_every_auto_class_without_seedlm(tmp_path):
    qwen3_moe_folder(tmp_path / "qwen")
    with umask_set_to(0o027):
        assert seedlm(["convert", "--from", "qwen3_moe", str(tmp_path / "qwen"), str(tmp_path / "ours")]) == 0
    modes = file_modes(tmp_path / "ours")  # the weights too, not safetensors' private 0600
    assert "model.safetensors" in modes and set(modes.values()) == {0o640}
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    outputs = reference_outputs(converted, torch.randint(0, 101, (2, 9)))
    ok = load_with_every_auto_class_without_seedlm([(tmp_path / "ours", outputs, True)], tmp_path)
    assert [line.split()[2:] for line in ok] == [["GatedMoeConfig", "GatedMoeModel", "GatedMoeForCausalLM"]]


def convert(src, out, capsys) -> str:
    """Run `seedlm convert --from qwen3_moe SRC OUT`, expect a refusal, return its message."""
    assert seedlm(["convert", "--from", "qwen3_moe", str(src), str(out)]) == 2
    return capsys.readouterr().err


def test_conversion_mistakes_get_clear_messages(tmp_path, capsys):
    err = convert(tmp_path / "missing", tmp_path / "out", capsys)
    assert "missing does not exist" in err and "config.json" not in err
    (tmp_path / "empty").mkdir()
    assert "has no config.json" in convert(tmp_path / "empty", tmp_path / "out", capsys)
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    err = convert(other, tmp_path / "out", capsys)
    assert "holds a 'llama' checkpoint" in err and "reads only ['qwen3_moe']" in err and "--from llama" not in err
    qwen3_moe_folder(tmp_path / "qwen")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("user data")
    assert "not empty" in convert(tmp_path / "qwen", tmp_path / "full", capsys)
    assert (tmp_path / "full" / "keep.txt").read_text() == "user data"
    assert not (tmp_path / "out").exists()


def test_a_config_without_weights_is_refused_naming_the_files(tmp_path, capsys):
    qwen3_moe_folder(tmp_path / "qwen")
    (tmp_path / "qwen" / "model.safetensors").unlink()
    err = convert(tmp_path / "qwen", tmp_path / "out", capsys)
    assert f"{tmp_path / 'qwen'} has a config.json but no weights" in err
    assert "*.safetensors or pytorch_model*.bin" in err and "Traceback" not in err
    assert (tmp_path / "qwen" / "config.json").is_file() and not (tmp_path / "out").exists()


def test_a_seedlm_folder_is_not_converted_and_the_message_says_why(tmp_path, capsys):
    config = DeltaProductConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_heads=2, head_dim=8)
    DeltaProductForCausalLM(config).save_pretrained(tmp_path / "export")
    before = sorted((p.name, p.stat().st_size) for p in (tmp_path / "export").iterdir())
    err = convert(tmp_path / "export", tmp_path / "out", capsys)
    assert "is already a seedlm model ('seedlm_deltaproduct') and needs no conversion" in err
    assert "from_pretrained" in err and "train.init_from" in err and "--from seedlm" not in err
    assert sorted((p.name, p.stat().st_size) for p in (tmp_path / "export").iterdir()) == before
    assert not (tmp_path / "out").exists()
