"""LFW on disk: locating, listing, protocol parsing, image processing, split and version."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from core import dataset as ds
from core.lfw import (
    PEOPLE_FILES_SHA256,
    PROTOCOL_FILES,
    CorruptImageError,
    LfwError,
    LfwNotFoundError,
    ProtocolFileError,
    check_protocol_against_images,
    iter_processed,
    list_images,
    locate_lfw,
    parse_pairs_file,
    parse_people_file,
    parse_people_folds_file,
    process_images,
    read_protocol,
)
from core.splits import identity_split, split_counts
from models.preprocessing import DEFAULT_PARAMS, preprocess_image
from tests.fake_lfw import build_fake_lfw


def _data_lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def _snapshot(root: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in root.rglob("*")}


def test_locate_finds_fake_tree(fake_lfw_session):
    source = locate_lfw(fake_lfw_session.data_home)
    assert source.lfw_home == fake_lfw_session.lfw_home
    assert source.images_dir.is_dir()


def test_locate_missing_home_names_it_and_creates_nothing(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(LfwNotFoundError, match=str(missing / "lfw_home")):
        locate_lfw(missing, download_if_missing=False)
    assert not missing.exists()


@pytest.mark.parametrize("filename", ["pairs.txt", "people.txt", "peopleDevTest.txt"])
def test_locate_missing_protocol_file_names_it(tmp_path, filename):
    from tests.fake_lfw import build_fake_lfw

    fake = build_fake_lfw(tmp_path, n_people=20, skip_protocol=(filename,))
    with pytest.raises(LfwNotFoundError, match=filename):
        locate_lfw(fake.data_home, download_if_missing=False)


def test_locate_without_the_funneled_folder_names_it_and_extracts_nothing(fake_lfw):
    """Another alignment's folder, or an archive left next to it: the error names the
    folder facereid reads, and the archive is neither extracted nor deleted (scikit-learn
    would do both, in what may be a read-only mirror)."""
    images = fake_lfw.lfw_home / "lfw_funneled"
    images.rename(fake_lfw.lfw_home / "lfw-deepfunneled")
    archive = fake_lfw.lfw_home / "lfw-funneled.tgz"
    archive.write_bytes(b"not really a tarball")
    before = _snapshot(fake_lfw.data_home)
    with pytest.raises(LfwNotFoundError, match=r"lfw_funneled does not exist \(lfw-deepfunneled"):
        locate_lfw(fake_lfw.data_home, download_if_missing=False)
    assert _snapshot(fake_lfw.data_home) == before


def test_locate_on_read_only_tree_writes_nothing(fake_lfw):
    before = _snapshot(fake_lfw.data_home)
    paths = [fake_lfw.data_home, *fake_lfw.data_home.rglob("*")]
    dirs = [p for p in paths if p.is_dir()]
    for d in dirs:
        d.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        source = locate_lfw(fake_lfw.data_home)
        assert len(list_images(source)) == fake_lfw.n_images
        read_protocol(source)
    finally:
        for d in dirs:
            d.chmod(stat.S_IRWXU)
    assert _snapshot(fake_lfw.data_home) == before


def test_list_images_sorted_and_ignores_junk(fake_lfw_session):
    refs = list_images(locate_lfw(fake_lfw_session.data_home))
    assert len(refs) == fake_lfw_session.n_images
    assert [(r.person, r.index) for r in refs] == sorted((r.person, r.index) for r in refs)
    assert all(r.path.endswith(".jpg") for r in refs)
    assert refs[0].image_id == f"{refs[0].person}/{refs[0].index:04d}"
    per_person = {p: sum(r.person == p for r in refs) for p in fake_lfw_session.people}
    assert per_person == fake_lfw_session.people


def test_protocol_tables_match_the_files(fake_lfw_session):
    lfw_home = fake_lfw_session.lfw_home
    protocol = read_protocol(locate_lfw(fake_lfw_session.data_home))
    assert set(protocol.tables) == set(PROTOCOL_FILES)
    assert set(protocol.file_hashes) >= {f for f, _ in PROTOCOL_FILES.values()}

    lines = _data_lines(lfw_home / "pairs.txt")
    n_folds, per_fold = int(lines[0][0]), int(lines[0][1])
    v2 = protocol.tables["pairs_view2"]
    assert v2.num_rows == len(lines) - 1 == n_folds * 2 * per_fold
    assert sorted(set(v2.column("fold").to_pylist())) == list(range(n_folds))
    # same pairs, same order, same labels as the file
    for row, line in zip(v2.to_pylist(), lines[1:], strict=True):
        if len(line) == 3:
            assert (row["label"], row["person_a"], row["person_b"]) == (1, line[0], line[0])
            assert (row["index_a"], row["index_b"]) == (int(line[1]), int(line[2]))
        else:
            assert row["label"] == 0
            assert (row["person_a"], row["index_a"]) == (line[0], int(line[1]))
            assert (row["person_b"], row["index_b"]) == (line[2], int(line[3]))
        assert row["image_id_a"] == f"{row['person_a']}/{row['index_a']:04d}"
    for fold in range(n_folds):
        labels = [r["label"] for r in v2.to_pylist() if r["fold"] == fold]
        assert labels == [1] * per_fold + [0] * per_fold

    for table, filename in (("pairs_view1_train", "pairsDevTrain.txt"),
                            ("pairs_view1_test", "pairsDevTest.txt")):  # fmt: skip
        lines = _data_lines(lfw_home / filename)
        t = protocol.tables[table]
        assert t.num_rows == len(lines) - 1 == 2 * int(lines[0][0])
        assert set(t.column("fold").to_pylist()) == {0}

    people_lines = _data_lines(lfw_home / "people.txt")
    pv2 = protocol.tables["people_view2"]
    assert pv2.num_rows == len(people_lines) - 1 - int(people_lines[0][0])
    assert dict(zip(pv2.column("person").to_pylist(), pv2.column("n_images").to_pylist(),
                    strict=True)) == fake_lfw_session.people  # fmt: skip
    for table, filename in (("people_view1_train", "peopleDevTrain.txt"),
                            ("people_view1_test", "peopleDevTest.txt")):  # fmt: skip
        lines = _data_lines(lfw_home / filename)
        assert protocol.tables[table].num_rows == len(lines) - 1 == int(lines[0][0])
    assert check_protocol_against_images(protocol, list_images(locate_lfw(lfw_home.parent))) == []


def test_malformed_protocol_lines_name_file_and_line(tmp_path):
    pairs = tmp_path / "pairsDevTrain.txt"
    pairs.write_text("2\nA\t1\t2\nB\t1\nC\t1\tD\t2\nE\t1\tF\t1\n")
    with pytest.raises(ProtocolFileError, match=rf"{pairs}:3: expected name i j"):
        parse_pairs_file(pairs)
    pairs.write_text("2\nA\t1\t2\n")
    with pytest.raises(ProtocolFileError, match="promises 4 pairs"):
        parse_pairs_file(pairs)
    pairs.write_text("1\nA\tone\t2\nB\t1\tC\t2\n")
    with pytest.raises(ProtocolFileError, match=r":2: expected an integer, got 'one'"):
        parse_pairs_file(pairs)
    people = tmp_path / "peopleDevTest.txt"
    people.write_text("3\nA\t1\nB\t2\n")
    with pytest.raises(ProtocolFileError, match="promises 3 people"):
        parse_people_file(people)
    folds = tmp_path / "people.txt"
    folds.write_text("2\n1\nA\t1\n2\nB\t1\n")
    with pytest.raises(ProtocolFileError, match="fold 1 promises 2 people"):
        parse_people_folds_file(folds)
    # saved by an editor in another encoding: the file, the byte and the line are named
    pairs.write_bytes("1\nJos\u00e9\t1\t2\n".encode("latin-1"))
    with pytest.raises(ProtocolFileError, match=rf"{pairs}: not UTF-8 text \(byte 5, line 2\)"):
        parse_pairs_file(pairs)


def test_pair_naming_a_missing_image_is_an_error(fake_lfw):
    """Images gone of someone no pair names: a warning; of someone a pair names: an error."""
    source = locate_lfw(fake_lfw.data_home)
    protocol = read_protocol(source)
    in_pairs = {
        person
        for t in ("pairs_view1_train", "pairs_view1_test", "pairs_view2")
        for r in protocol.tables[t].to_pylist()
        for person in (r["person_a"], r["person_b"])
    }
    unpaired = sorted(set(fake_lfw.people) - in_pairs)
    assert unpaired and in_pairs  # the fake tree has both kinds

    def remove_images(person: str) -> None:
        for path in (fake_lfw.lfw_home / "lfw_funneled" / person).iterdir():
            path.unlink()

    remove_images(unpaired[0])
    warnings = check_protocol_against_images(protocol, list_images(source))
    assert any(unpaired[0] in w for w in warnings)
    remove_images(sorted(in_pairs)[0])
    with pytest.raises(ProtocolFileError, match="not in the images folder"):
        check_protocol_against_images(protocol, list_images(source))


def test_process_images_matches_shared_preprocessing(fake_lfw_session):
    refs = list_images(locate_lfw(fake_lfw_session.data_home))[:5]
    chunk = process_images([r.path for r in refs])
    for ref, sha, jpeg, face in zip(refs, chunk.sha256, chunk.jpeg, chunk.faces, strict=True):
        data = Path(ref.path).read_bytes()
        assert jpeg == data
        assert sha == hashlib.sha256(data).hexdigest()
        np.testing.assert_array_equal(face, preprocess_image(data, DEFAULT_PARAMS))
        assert face.shape == DEFAULT_PARAMS.shape
        assert abs(float(face.mean())) < 1e-4 and abs(float(face.std()) - 1) < 1e-3


def test_pool_gives_the_same_faces_in_order(fake_lfw_session):
    paths = [r.path for r in list_images(locate_lfw(fake_lfw_session.data_home))][:40]
    chunks = [paths[i : i + 7] for i in range(0, len(paths), 7)]
    inline = list(iter_processed(chunks, workers=1))
    pooled = list(iter_processed(chunks, workers=2))
    assert [c.sha256 for c in pooled] == [c.sha256 for c in inline]
    for a, b in zip(pooled, inline, strict=True):
        np.testing.assert_array_equal(a.faces, b.faces)


def test_corrupt_jpeg_error_names_the_file(fake_lfw):
    refs = list_images(locate_lfw(fake_lfw.data_home))
    victim = Path(refs[3].path)
    victim.write_bytes(victim.read_bytes()[:200])  # truncated mid-stream
    chunks = [[r.path for r in refs[:3]], [r.path for r in refs[3:6]]]
    with pytest.raises(CorruptImageError, match=str(victim)):
        list(iter_processed(chunks, workers=2))
    with pytest.raises(CorruptImageError, match=str(victim)):
        process_images([str(victim)])


def test_identity_split_is_disjoint_deterministic_and_near_fractions():
    rng = np.random.default_rng(0)
    counts = {f"p{i:04d}": int(n) for i, n in enumerate(rng.geometric(0.4, size=800))}
    split = identity_split(counts, seed=7, val_fraction=0.1, test_fraction=0.2)
    assert set(split) == set(counts) and set(split.values()) == {"train", "val", "test"}
    assert identity_split(dict(reversed(counts.items())), seed=7, val_fraction=0.1,
                          test_fraction=0.2) == split  # fmt: skip
    assert identity_split(counts, seed=8, val_fraction=0.1, test_fraction=0.2) != split
    total = sum(counts.values())
    sizes = split_counts(split, counts)
    assert abs(sizes["val"]["images"] / total - 0.1) < 0.02
    assert abs(sizes["test"]["images"] / total - 0.2) < 0.02
    assert sum(s["people"] for s in sizes.values()) == len(counts)


@pytest.mark.parametrize("val,test", [(0.5, 0.5), (-0.1, 0.1), (0.1, 1.0)])
def test_identity_split_rejects_bad_fractions(val, test):
    with pytest.raises(ValueError):
        identity_split({"a": 1}, val_fraction=val, test_fraction=test)


def test_version_depends_on_content_not_order():
    images = [("A/0001", "aa"), ("B/0001", "bb")]
    params = DEFAULT_PARAMS.to_dict()
    split = {"seed": 1}
    v = ds.compute_version(images, {"pairs.txt": "x"}, params, split)
    assert len(v) == 16 and int(v, 16) >= 0
    assert ds.compute_version(list(reversed(images)), {"pairs.txt": "x"}, params, split) == v
    assert ds.compute_version([("A/0001", "ab"), images[1]], {"pairs.txt": "x"}, params, split) != v
    assert ds.compute_version(images, {"pairs.txt": "y"}, params, split) != v
    assert ds.compute_version(images, {"pairs.txt": "x"}, {**params, "height": 1}, split) != v
    assert ds.compute_version(images, {"pairs.txt": "x"}, params, {"seed": 2}) != v


@pytest.mark.real_lfw
def test_real_protocol_files_parse(real_lfw_data_home):
    source = locate_lfw(real_lfw_data_home)
    protocol = read_protocol(source)
    counts = {name: t.num_rows for name, t in protocol.tables.items()}
    assert counts["pairs_view2"] == 6000
    assert counts["pairs_view1_train"] == 2200 and counts["pairs_view1_test"] == 1000
    assert counts["people_view2"] == 5749
    assert counts["people_view1_train"] + counts["people_view1_test"] == 5749
    images = list_images(source)
    assert len(images) == 13233 and len({r.person for r in images}) == 5749
    assert check_protocol_against_images(protocol, images) == []
    assert os.access(real_lfw_data_home, os.R_OK)


@pytest.fixture
def mirror(tmp_path):
    """A real HTTP server on 127.0.0.1 serving the files put in its (empty) root."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    root = tmp_path / "mirror"
    root.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def people_mirror(mirror, real_lfw_data_home):
    """The mirror serving a copy of the official people files."""
    import shutil

    root, url = mirror
    for name in PEOPLE_FILES_SHA256:
        shutil.copy(real_lfw_data_home / "lfw_home" / name, root / name)
    return root, url


def _without_people_files(tmp_path):
    """Images and pairs present (what sklearn fetches), people files missing."""
    return build_fake_lfw(tmp_path / "lfw", n_people=20, skip_protocol=tuple(PEOPLE_FILES_SHA256))


@pytest.mark.real_lfw
def test_download_fetches_the_people_files_sklearn_does_not(people_mirror, tmp_path):
    root, url = people_mirror
    fake = _without_people_files(tmp_path)
    with pytest.raises(LfwNotFoundError, match="people"):
        locate_lfw(fake.data_home, download_if_missing=False)  # offline: nothing fetched
    source = locate_lfw(fake.data_home, download_if_missing=True, people_files_url=url)
    for name in PEOPLE_FILES_SHA256:
        assert (source.lfw_home / name).read_bytes() == (root / name).read_bytes()
    assert not list(source.lfw_home.glob(".*.part"))
    (root / "people.txt").unlink()  # present files are not fetched again
    assert locate_lfw(fake.data_home, download_if_missing=True, people_files_url=url)


def test_download_refuses_a_file_that_is_not_the_official_one(mirror, tmp_path):
    """Needs no real files: a captive portal's page under every name is refused by its
    SHA-256, and nothing is published."""
    root, url = mirror
    for name in PEOPLE_FILES_SHA256:
        (root / name).write_text("<html>captive portal</html>")
    fake = _without_people_files(tmp_path)
    with pytest.raises(LfwError, match=r"is not the LFW people\w*\.txt: sha256"):
        locate_lfw(fake.data_home, download_if_missing=True, people_files_url=url)
    for name in PEOPLE_FILES_SHA256:
        assert not (fake.lfw_home / name).exists()
    assert not list(fake.lfw_home.glob(".*.part"))


def test_download_failure_is_a_retryable_error_not_not_found(tmp_path, dead_port):
    fake = _without_people_files(tmp_path)
    url = f"http://127.0.0.1:{dead_port}/"  # nobody listens
    with pytest.raises(LfwError, match="could not download LFW protocol file") as info:
        locate_lfw(fake.data_home, download_if_missing=True, people_files_url=url)
    assert type(info.value) is LfwError  # the ingest task retries exactly this type
