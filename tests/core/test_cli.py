"""``facereid`` as a user runs it: ordinary bad input gives a message and an exit code,
never a traceback; a named list that got no results says why."""

from __future__ import annotations

import contextlib
import io

import pytest

from core.cli import main
from core.ledger import record_processed

LIST = "image_a,image_b,label\nimages/a.jpg,images/b.jpg,1\n"


def cli(*argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``facereid argv``. Plain buffers rather than
    capsys: Prefect's log handlers outlive a test and must not keep a closed stream."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exit_:
            code = int(exit_.code or 0)
    return code, out.getvalue(), err.getvalue()


def test_unknown_model_names_are_refused_by_the_parser() -> None:
    for argv in (["retrain", "--models", "pca,foo"], ["demo", "--view2", "PCA,bar"]):
        code, _, err = cli(*argv)
        assert code == 2 and "unknown model(s)" in err


def test_model_lists_are_normalised() -> None:
    from core.cli import build_parser

    args = build_parser().parse_args(["retrain", "--models", " Siamese , pca,pca", "--view2", ""])
    assert (args.models, args.view2) == (["siamese", "pca"], [])


def test_retrain_help_states_the_flows_own_defaults() -> None:
    """The CLI leaves unset options to the flow; its help quotes the flow's defaults."""
    import inspect

    from flows.retrain import retrain

    defaults = inspect.signature(retrain.fn).parameters
    code, out, _ = cli("retrain", "--help")
    help_text = " ".join(out.split())
    assert code == 0
    for option, parameter in (
        ("--siamese-epochs", "siamese_epochs"),
        ("--siamese-max-train-seconds", "siamese_max_train_seconds"),
    ):
        assert f"(default: {defaults[parameter].default})" in help_text.split(option)[-1], option


@pytest.mark.usefixtures("prefect_harness")
def test_verify_without_a_promoted_model_is_an_error_not_a_traceback(
    local_storage, settings_env, tmp_path
) -> None:
    settings_env(local_storage)
    path = tmp_path / "night.csv"
    path.write_text(LIST)
    assert cli("drop", str(path))[0] == 0
    code, _, err = cli("verify")
    assert code == 2
    assert err.rstrip().splitlines()[-1].startswith("facereid verify: error: no promoted model")
    assert "run retrain" in err


@pytest.mark.usefixtures("prefect_harness")
def test_verify_of_a_named_list_that_got_no_results_says_why(
    local_storage, settings_env, tmp_path
) -> None:
    from core import registry
    from tests.core.test_registry import CARD, T0, make_model_dir

    settings_env(local_storage)
    model_dir, metrics = make_model_dir(tmp_path / "pca", 0.8)
    version = registry.register_version(local_storage, "pca", model_dir, metrics, CARD, now=T0)
    registry.promote_if_better(local_storage, "pca", version)

    code, _, err = cli("verify", "--list-key", "incoming/typo.csv")
    assert code == 1 and "incoming/typo.csv does not exist" in err

    local_storage.put_bytes("incoming/done.csv", LIST.encode())
    etag = local_storage.head("incoming/done.csv").etag
    record_processed(local_storage, "incoming/done.csv", etag, {"result_key": "results/done/x"})
    code, _, err = cli("verify", "--list-key", "incoming/done.csv")
    assert code == 0 and "verified already: facereid results done" in err

    local_storage.put_bytes("incoming/broken.csv", b"foo,bar\n1,2\n")
    code, _, err = cli("verify", "--list-key", "incoming/broken.csv")
    assert code == 1
    assert "incoming/broken.csv was rejected" in err and "rejected/broken.csv" in err

    local_storage.put_bytes("incoming/ok.csv", LIST.encode())  # images missing: still verified
    code, out, _ = cli("verify", "--list-key", "incoming/ok.csv")
    assert code == 0 and '"list_key": "incoming/ok.csv"' in out

    # a run over all lists exits 1 when one was rejected (cron sees it), then 0
    local_storage.put_bytes("incoming/broken2.csv", b"foo,bar\n1,2\n")
    local_storage.put_bytes("incoming/ok2.csv", LIST.encode())
    code, out, err = cli("verify")
    assert code == 1 and '"list_key": "incoming/ok2.csv"' in out
    assert "incoming/broken2.csv was rejected" in err
    code, _, err = cli("verify")
    assert code == 0 and "rejected" not in err


def test_redropping_verified_content_says_it_will_not_be_verified_again(
    local_storage, settings_env, tmp_path
) -> None:
    settings_env(local_storage)
    path = tmp_path / "night.csv"
    path.write_text(LIST)
    code, out, _ = cli("drop", str(path))
    assert code == 0 and "verified already" not in out
    etag = local_storage.head("incoming/night.csv").etag
    record_processed(local_storage, "incoming/night.csv", etag, {"result_key": "results/night/x"})
    code, out, _ = cli("drop", str(path))
    assert code == 0 and "was verified already" in out and "facereid results night" in out
    code, _, err = cli("drop", str(tmp_path / "missing.csv"))
    assert code == 2 and "is not a file" in err


def test_two_drops_racing_to_one_name_never_lose_a_list(s3_storage, tmp_path) -> None:
    """The second drop checked before the first landed: its write is conditional on what
    it checked, so it is refused rather than replacing the unverified first list."""
    from core.cli_verify import drop_pair_list

    storage = s3_storage
    first, second = tmp_path / "first.csv", tmp_path / "second.csv"
    first.write_text(LIST)
    second.write_text(LIST + "images/c.jpg,images/d.jpg\n")
    real_head = storage.head

    def head_then_other_drop_lands(key):
        storage.head = real_head  # type: ignore[method-assign]
        try:
            return real_head(key)  # what the second drop sees: nothing there yet
        finally:
            drop_pair_list(storage, first, name="team.csv")  # the first drop lands meanwhile

    storage.head = head_then_other_drop_lands  # type: ignore[method-assign]
    with pytest.raises(FileExistsError, match="no run has verified yet"):
        drop_pair_list(storage, second, name="team.csv")
    assert storage.get_bytes("incoming/team.csv") == first.read_bytes()
    assert real_head("incoming/team.csv").size == first.stat().st_size
    # --force replaces it
    assert drop_pair_list(storage, second, name="team.csv", force=True) == "incoming/team.csv"
    assert storage.get_bytes("incoming/team.csv") == second.read_bytes()


def test_a_drop_that_would_share_a_results_folder_is_refused(local_storage, tmp_path) -> None:
    from core.cli_verify import drop_pair_list

    path = tmp_path / "night.csv"
    path.write_text(LIST)
    local_storage.put_bytes("incoming/night.parquet", b"any")
    local_storage.put_bytes("incoming/team/night.csv", b"any")  # results/team/night/: fine
    with pytest.raises(FileExistsError, match="already writes its results to results/night/"):
        drop_pair_list(local_storage, path)
    assert drop_pair_list(local_storage, path, name="night2.csv") == "incoming/night2.csv"
