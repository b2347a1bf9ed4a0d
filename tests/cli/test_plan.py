import json

import pytest

from moequant.recipe import load_recipe
from tests.cli.test_cli_errors import assert_one_line_error, run

SMALL = ("--samples", "4", "--seqlen", "64", "--device", "cpu")


def test_plan_then_compress_with_it(tmp_path, tiny_mixtral_tok):
    plan = tmp_path / "plan.yaml"
    code, output = run("plan", str(tiny_mixtral_tok), "--bits", "2.5", "--kinds", "expert", "-o", str(plan), *SMALL)
    assert code == 0, output
    assert "planned 24 modules (expert)" in output and "2.5000 bits on average" in output
    assert load_recipe(plan).rules[0].modules
    code, output = run("plan", str(tiny_mixtral_tok), "--bits", "2.5", "-o", str(plan), *SMALL)
    assert_one_line_error(code, output, "exists; pass --overwrite")

    code, output = run("compress", str(tiny_mixtral_tok), "--recipe", str(plan), "-o", str(tmp_path / "out"), *SMALL)
    assert code == 0, output
    modules = json.loads((tmp_path / "out" / "moequant.json").read_text())["modules"]
    assert {m["bits"] for m in modules.values() if m["kind"] == "expert"} == {
        r.bits for r in load_recipe(plan).rules if r.modules}


def test_compress_with_a_size(tmp_path, tiny_mixtral_tok):
    out = tmp_path / "out"
    code, output = run("compress", str(tiny_mixtral_tok), "--size", "700kB", "-o", str(out), *SMALL)
    assert code == 0, output
    assert "planned for 700,000 size" in output and (out / "plan.yaml").is_file()
    assert sum(f.stat().st_size for f in out.iterdir()) <= 700_000


@pytest.mark.parametrize("args, needle", [
    ((), "give a budget: --bits"),
    (("--bits", "9"), "--bits 9 is out of reach"),
    (("--size", "2 furlongs"), "is not a size"),
    (("--bits", "3", "--choices", "2,x"), "--choices must be widths separated by commas"),
    (("--bits", "3", "--kinds", "experts"), "--kinds takes attention, expert"),
])
def test_bad_budgets_are_one_line(tmp_path, tiny_mixtral_tok, args, needle):
    code, output = run("plan", str(tiny_mixtral_tok), "-o", str(tmp_path / "p.yaml"), *args, *SMALL)
    assert_one_line_error(code, output, needle)
