"""Parameters (glad_core/params.py): validated up front with errors naming key, value and what is allowed;
YAML files and the `run` command line parsed into the validated grid; fuzzed input raises only ParamError."""
from __future__ import annotations

from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import cell_params
from glad_core import params as P


@pytest.fixture()
def base_params(tiny_config, data_root, tmp_path) -> dict[str, Any]:
    return cell_params(tiny_config, data_root, tmp_path / "results")


@pytest.mark.parametrize("key, value, allowed", [
    ("shots", 0, "[1, inf]"),
    ("shots", "four", "expected int"),
    ("epochs", 2.5, "expected int"),
    ("alpha", 1.5, "[0, 1]"),
    ("alpha", -0.1, "[0, 1]"),
    ("rho", -0.05, "[0, inf]"),
    ("lr", "fast", "expected int/float"),
    ("methods", ["glad", "gald"], "lora+gradreg"),
    ("datasets", ["eurosatt"], "eurosat"),
    ("protocol", "few_shot", "base_to_novel"),
    ("backbone", "ViT-B-33", "open_clip.list_models()"),
    ("precision", "fp8", "bf16"),
    ("device", "tpu", "cuda"),
    ("lora_towers", ["image", "audio"], "image"),
])
def test_bad_value_names_key_value_and_allowed(base_params, key, value, allowed):
    with pytest.raises(P.ParamError) as e:
        P.validate({**base_params, key: value})
    msg = str(e.value)
    shown = value[-1] if key in ("methods", "datasets") else value
    assert repr(key) in msg and repr(shown) in msg and allowed in msg, msg


def test_unknown_key_names_key_value_and_allowed_keys(base_params):
    with pytest.raises(P.ParamError) as e:
        P.validate({**base_params, "learning_rate": 0.1})
    msg = str(e.value)
    assert "'learning_rate'" in msg and "0.1" in msg and "'lr'" in msg and "'rho'" in msg, msg


def test_validation_happens_before_any_work(base_params, tmp_path, monkeypatch, capsys):
    """A bad value anywhere in the file stops the run before any cell starts or any file is written."""
    import glad_core.protocols
    from glad_core.__main__ import main

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**base_params, "methods": ["zeroshot", "glad"], "alpha": 2.0}))
    monkeypatch.setattr(glad_core.protocols, "run_cell", lambda *a, **k: pytest.fail("a cell ran"))
    assert main(["run", str(path)]) == 2
    assert "'alpha' = 2.0" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_cli_run_takes_a_file_and_overrides_or_overrides_alone(base_params, tmp_path, monkeypatch, capsys):
    """`run [params.yaml] --key value ...`: the README's commands parse into the validated grid."""
    import glad_core.__main__ as cli

    seen = []
    monkeypatch.setattr(cli, "cmd_run", seen.append)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(base_params))
    assert cli.main(["run", str(path), "--epochs", "2", "--seeds", "1,2"]) == 0
    assert seen[-1]["epochs"] == 2 and seen[-1]["seeds"] == [1, 2]
    assert cli.main(["run", "--protocol", "base_to_novel", "--datasets", "eurosat", "--data-root", "/data",
                     "--backbone", "glad-mini", "--methods", "zeroshot,lora,glad", "--shots", "16"]) == 0
    assert (seen[-1]["datasets"], seen[-1]["methods"], seen[-1]["shots"], seen[-1]["data_root"]) == \
        (["eurosat"], ["zeroshot", "lora", "glad"], 16, "/data")
    assert cli.main(["run", "--datasets"]) == 2
    assert "'datasets' has no value" in capsys.readouterr().err


def _values() -> st.SearchStrategy:
    scalars = (st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=True)
               | st.text(max_size=12) | st.sampled_from(["glad", "eurosat", "ViT-B-32", "image", "text", "1e-3",
                                                         "nan", "cpu", "auto", "base_to_novel"]))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                                            max_size=3),
                        max_leaves=8)


def _fuzz_params() -> st.SearchStrategy:
    keys = st.sampled_from(sorted(P.SCHEMA)) | st.text(max_size=10)
    return st.dictionaries(keys, _values(), max_size=6)


def _check_valid(out: dict[str, Any]) -> None:
    """A mapping `validate` accepts builds its cells and validates again to itself."""
    assert P.validate(out) == out
    P.cells(out)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params=_fuzz_params())
def test_validate_fuzz_raises_only_param_error(params):
    try:
        out = P.validate({"datasets": ["eurosat"], **params})
    except P.ParamError:
        return
    _check_valid(out)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=80) | _fuzz_params().map(lambda d: yaml.safe_dump({"datasets": ["eurosat"], **d})))
def test_load_fuzz_yaml_raises_only_param_error(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        out = P.load(path)
    except P.ParamError:
        return
    _check_valid(out)


@pytest.mark.parametrize("text", ["datasets: [eurosat]\nseed: 2001-13-45\n", "- a\n- b\n", "datasets: [eurosat\n",
                                  "? [a, b]\n: 1\n", "lr: .nan\ndatasets: [eurosat]\n"])
def test_load_malformed_yaml(tmp_path, text):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(P.ParamError):
        P.load(path)


def test_load_undecodable_file(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_bytes(b"datasets: [\xff\xfe]\n")
    with pytest.raises(P.ParamError, match="p.yaml"):
        P.load(path)


def test_method_settings_in_parameter_files():
    from glad_core import params as P

    p = {"datasets": ["tuxpaint"], "methods": ["glad", "clip_lora"], "lr": 1e-3, "rank": 4,
         "method_settings": {"clip_lora": {"lr": 2e-4, "iterations_per_shot": 10}}}
    glad, clip_lora = (c.train for c in P.cells(p))
    assert (glad.lr, glad.hparams["rank"]) == (1e-3, 4)  # flat keys: every method declaring them
    assert (clip_lora.lr, clip_lora.hparams["rank"], clip_lora.hparams["iterations_per_shot"]) == (2e-4, 4, 10)
    assert glad.kl_weight == 1.0 and clip_lora.kl_weight == 0.0  # unset: each method's own default
    with pytest.raises(P.ParamError, match=r"method_settings.glad.n_ctx.*not a setting of method 'glad'"):
        P.validate({**p, "method_settings": {"glad": {"n_ctx": 4}}})
    with pytest.raises(P.ParamError, match="unknown method"):
        P.validate({**p, "method_settings": {"gald": {}}})
    with pytest.raises(P.ParamError, match=r"'method_settings.glad.rank' = 0 is invalid"):
        P.validate({**p, "method_settings": {"glad": {"rank": 0}}})
    P.validate({"datasets": ["tuxpaint"], "backbone": "hf-hub:timm/ViT-B-16-SigLIP"})  # what load_backbone takes
