"""``sae-steer convert``: pickled SAEs in each project's exact key names and shapes -> SAELens
folder -> load_sae, compared with that project's own encode rule (written out here from its
source, not from ours). Pickles carrying anything but tensors are refused; the server-side
loader never unpickles and points at ``convert``."""

from __future__ import annotations

import collections
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sae_steer_vllm.cli import main as cli_main
from sae_steer_vllm.sae import SAEFormatError, load_sae, read_config
from sae_steer_vllm.sae.convert import ConvertCommand, convert

D, S = 12, 40
X = torch.randn(32, D, generator=torch.Generator().manual_seed(5))
Ref = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dl_autoencoder() -> tuple[dict[str, torch.Tensor], Ref]:
    """dictionary_learning AutoEncoder: relu(encoder(x - bias)); decoder(f) + bias."""
    g = _g()
    t = collections.OrderedDict(
        bias=torch.randn(D, generator=g),
        **{
            "encoder.weight": torch.randn(S, D, generator=g),
            "encoder.bias": torch.randn(S, generator=g),
            "decoder.weight": torch.randn(D, S, generator=g),
        },
    )

    def ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = F.relu(F.linear(x - t["bias"], t["encoder.weight"], t["encoder.bias"]))
        return f, F.linear(f, t["decoder.weight"]) + t["bias"]

    return t, ref


def _dl_topk(batch: bool) -> tuple[dict[str, torch.Tensor], Ref]:
    """AutoEncoderTopK.encode (top-k of relu) / BatchTopKSAE.encode (relu > threshold)."""
    g = _g(1)
    t = {
        "k": torch.tensor(5, dtype=torch.int),
        "threshold": torch.tensor(0.7 if batch else -1.0),
        "decoder.weight": torch.randn(D, S, generator=g),
        "encoder.weight": torch.randn(S, D, generator=g),
        "encoder.bias": torch.randn(S, generator=g),
        "b_dec": torch.randn(D, generator=g),
    }

    def ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        post = F.relu(F.linear(x - t["b_dec"], t["encoder.weight"], t["encoder.bias"]))
        if batch:
            f = post * (post > t["threshold"])
        else:
            top = post.topk(int(t["k"]), sorted=False, dim=-1)
            f = torch.zeros_like(post).scatter_(-1, top.indices, top.values)
        return f, F.linear(f, t["decoder.weight"]) + t["b_dec"]

    return t, ref


def _dl_jumprelu() -> tuple[dict[str, torch.Tensor], Ref]:
    """JumpReluAutoEncoder.encode: relu(pre * (pre > threshold)), pre = x @ W_enc + b_enc."""
    g = _g(2)
    t = {
        "W_enc": torch.randn(D, S, generator=g),
        "b_enc": torch.randn(S, generator=g),
        "W_dec": torch.randn(S, D, generator=g),
        "b_dec": torch.randn(D, generator=g),
        "threshold": torch.rand(S, generator=g) * 2,
    }

    def ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = x @ t["W_enc"] + t["b_enc"]
        f = F.relu(pre * (pre > t["threshold"]))
        return f, f @ t["W_dec"] + t["b_dec"]

    return t, ref


def _linear_pair(
    enc: str, dec: str, seed: int, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, torch.Tensor], Ref]:
    """Goodfire's / qresearch's SparseAutoEncoder: relu(enc(x)); dec(f) (nn.Linear pairs;
    both release bfloat16 weights)."""
    g = _g(seed)
    t = {
        f"{enc}.weight": torch.randn(S, D, generator=g).to(dtype),
        f"{enc}.bias": torch.randn(S, generator=g).to(dtype),
        f"{dec}.weight": torch.randn(D, S, generator=g).to(dtype),
        f"{dec}.bias": torch.randn(D, generator=g).to(dtype),
    }
    w = {k: v.float() for k, v in t.items()}  # the reference computes in float32

    def ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = F.relu(F.linear(x, w[f"{enc}.weight"], w[f"{enc}.bias"]))
        return f, F.linear(f, w[f"{dec}.weight"], w[f"{dec}.bias"])

    return t, ref


CASES: dict[str, tuple[Callable[[], tuple[dict[str, torch.Tensor], Ref]], str, dict]] = {
    "dictionary_learning AutoEncoder": (_dl_autoencoder, "ae.pt", {}),
    "dictionary_learning TopK": (
        lambda: _dl_topk(False),
        "ae.pt",
        {"dict_class": "AutoEncoderTopK"},
    ),
    "dictionary_learning BatchTopK": (
        lambda: _dl_topk(True),
        "ae.pt",
        {"dict_class": "BatchTopKSAE"},
    ),
    "dictionary_learning JumpReLU": (_dl_jumprelu, "ae.pt", {}),
    "goodfire": (
        lambda: _linear_pair("encoder_linear", "decoder_linear", 3, torch.bfloat16),
        "Llama-3.1-8B-Instruct-SAE-l19.pth",
        {},
    ),
    "qresearch": (
        lambda: _linear_pair("encoder", "decoder", 4, torch.bfloat16),
        "DeepSeek-R1-Distill-Llama-8B-SAE-l19.pt",
        {},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_convert_matches_each_projects_encode(tmp_path: Path, case: str) -> None:
    build, filename, extra = CASES[case]
    tensors, ref = build()
    src = tmp_path / filename
    torch.save(tensors, src)
    out = convert(ConvertCommand(input=src, out=tmp_path / "sae", layer=3, **extra))
    assert read_config(out)[2] == "saelens" and not list(out.glob("*.pt"))
    sae = load_sae(out)
    assert sae.cfg.hook_layer == 3 and sae.cfg.hook_name == "blocks.3.hook_resid_post"
    f_ref, recon_ref = ref(X)
    acts = sae.encode(X)
    assert 0 < int((f_ref != 0).sum()) < f_ref.numel()
    torch.testing.assert_close(acts, f_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.decode(acts), recon_ref, atol=1e-4, rtol=1e-5)


def test_dictionary_learning_config_beside_gives_class_and_layer(tmp_path: Path) -> None:
    tensors, ref = _dl_topk(False)
    (tmp_path / "trainer_0").mkdir()
    src = tmp_path / "trainer_0" / "ae.pt"
    torch.save(tensors, src)
    trainer = {"dict_class": "AutoEncoderTopK", "layer": 7, "lm_name": "tiny/model", "k": 5}
    (src.parent / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {}}))
    sae = load_sae(convert(ConvertCommand(input=src, out=tmp_path / "sae")))
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.hook_layer) == ("topk", 5, 7)
    assert sae.cfg.model_name == "tiny/model"
    torch.testing.assert_close(sae.encode(X), ref(X)[0], atol=1e-5, rtol=1e-5)


class _NotATensor:
    pass


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (
            {"encoder.weight": torch.zeros(S, D), "cfg": {"layer": 3}},
            "not tensors: {'cfg': 'dict'}",
        ),
        ({"encoder.weight": torch.zeros(S, D), "obj": _NotATensor()}, "not a tensors-only pickle"),
        ([torch.zeros(2)], "holds a list"),
        (
            {"encoder.weight": torch.zeros(S, D), "decoder.weight": torch.zeros(D, S)},
            "match no known pickled SAE layout",
        ),
    ],
)
def test_non_tensor_pickles_refused(tmp_path: Path, payload: object, needle: str) -> None:
    src = tmp_path / "ae.pt"
    torch.save(payload, src)
    with pytest.raises(SAEFormatError) as e:
        convert(ConvertCommand(input=src, out=tmp_path / "sae", layer=1))
    assert needle in str(e.value) and str(src) in str(e.value)
    assert not (tmp_path / "sae").exists()


def test_topk_family_without_class_asks_for_it(tmp_path: Path) -> None:
    torch.save(_dl_topk(False)[0], tmp_path / "ae.pt")
    with pytest.raises(SAEFormatError, match="--dict-class"):
        convert(ConvertCommand(input=tmp_path / "ae.pt", out=tmp_path / "sae", layer=1))


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(_linear_pair("encoder_linear", "decoder_linear", 3)[0], tmp_path / "g.pth")
    argv = ["convert", "--input", str(tmp_path / "g.pth"), "--out", str(tmp_path / "sae")]
    assert cli_main(argv) == 1  # no layer: the file cannot say
    assert "pass --layer" in capsys.readouterr().err
    assert cli_main([*argv, "--layer", "2"]) == 0
    assert cli_main([*argv, "--layer", "2"]) == 2  # output folder not empty: usage error
    assert load_sae(tmp_path / "sae").cfg.hook_layer == 2


def test_server_loader_refuses_pickles_and_names_convert(tmp_path: Path) -> None:
    folder = tmp_path / "goodfire"
    folder.mkdir()
    torch.save(_linear_pair("encoder_linear", "decoder_linear", 3)[0], folder / "sae.pth")
    with pytest.raises(SAEFormatError) as e:
        load_sae(folder)
    assert "never unpickles" in str(e.value) and "sae-steer convert" in str(e.value)
