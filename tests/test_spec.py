from pathlib import Path

import pytest

from hierseg.spec import JobSpec, SpecError, load_spec

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = "data: {train: a, val: b, batch_size: 4}\nrun: {max_steps: 10}\n"


def _write(tmp_path, text):
    p = tmp_path / "spec.yaml"
    p.write_text(text)
    return p


def test_example_specs_are_valid():
    """Every committed example spec validates."""
    specs = sorted((ROOT / "examples" / "specs").glob("*.yaml"))
    assert specs
    for p in specs:
        if p.name.startswith("sweep"):
            continue
        assert isinstance(load_spec(p), JobSpec)


def test_defaults_and_overrides_with_coercion(tmp_path):
    """lambda_coarse defaults to 0.2; --set values are parsed as YAML and land typed."""
    spec = load_spec(_write(tmp_path, MINIMAL))
    assert spec.loss.lambda_coarse == 0.2 and spec.hierarchy.build().num_groups == [5]
    spec = load_spec(_write(tmp_path, MINIMAL), ["loss.lambda_coarse=0.5", "run.max_steps=7", "optim.grad_clip=null"])
    assert spec.loss.lambda_coarse == 0.5 and spec.run.max_steps == 7 and spec.optim.grad_clip is None


def test_unknown_key_suggests_close_match(tmp_path):
    """A misspelt key is an error with a did-you-mean suggestion."""
    with pytest.raises(SpecError, match=r"loss\.lamda_coarse: unknown field; did you mean lambda_coarse\?"):
        load_spec(_write(tmp_path, MINIMAL + "loss: {lamda_coarse: 0.1}\n"))


def test_every_bad_field_is_listed(tmp_path):
    """All bad fields are reported at once, each with its dotted path."""
    text = "data: {train: a, val: b, batch_size: 0}\nrun: {max_steps: -3, num_workers: 0}\nmodel: {depth: 99}\n"
    with pytest.raises(SpecError) as e:
        load_spec(_write(tmp_path, text))
    msg = str(e.value)
    for path in ("data.batch_size", "run.max_steps", "run.num_workers", "model.depth"):
        assert path in msg
    assert len(e.value.errors) == 4


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "empty"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("data: {train: a\n  val: [\n", "YAML syntax error at line"),
        ("run: {max_steps: 1}\nrun: {max_steps: 2}\n", "duplicate key 'run'"),
        ("run: {max_steps: 1}\n", "data: required field is missing"),
        (MINIMAL + "hierarchy: {levels: [{name: c, groups: {a: [axon]}}]}\n", "hierarchy: .*in no group"),
        (MINIMAL.replace("batch_size: 4", "batch_size: 3"), "multiple of run.num_workers"),
        (MINIMAL + "loss: {lambda_coarse: -1}\n", "loss.lambda_coarse: must be >= 0"),
    ],
)
def test_bad_specs_name_the_problem(tmp_path, text, match):
    """Empty file, non-mapping, syntax error with line, duplicates, missing, bad hierarchy, sizes."""
    with pytest.raises(SpecError, match=match):
        load_spec(_write(tmp_path, text))


def test_missing_file_and_bad_override(tmp_path):
    """A missing spec file and a malformed override are SpecErrors that say what to do."""
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match="expected key.path=value"):
        load_spec(_write(tmp_path, MINIMAL), ["loss.lambda_coarse"])
    with pytest.raises(SpecError, match="run.nope: unknown field"):
        load_spec(_write(tmp_path, MINIMAL), ["run.nope=1"])


def test_flat_params_cover_the_resolved_spec(tmp_path):
    """flat() gives dotted keys for MLflow params, including defaults."""
    flat = load_spec(_write(tmp_path, MINIMAL)).flat()
    assert flat["loss.lambda_coarse"] == 0.2 and flat["run.max_steps"] == 10 and "hierarchy.levels" in flat


def test_readme_spec_table_is_generated_from_the_spec() -> None:
    """The README's spec reference equals spec_table() (python -m hierseg.spec regenerates it)."""
    from pathlib import Path

    from hierseg.spec import spec_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("<!-- spec-table")
    block = readme[readme.index("\n", start) + 1 : readme.index("<!-- /spec-table -->")].strip()
    assert block == spec_table()
    assert "| `model.channels_last` | bool | `False` |" in block
