"""Downloads are checked against the published checksum; a mismatch deletes the file and is one line."""
from __future__ import annotations

import logging

import pytest

from msretrieval.data.download import PrepareError, RemoteFile, download

# RFC 1321 / FIPS 180-2 test vectors: the digests of b"abc"
MD5_ABC = "900150983cd24fb0d6963f7d28e17f72"
SHA256_ABC = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
URL_ENV = "TEST_DOWNLOAD_URL"


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A local folder served through a file:// URL (no network) holding ``data.bin`` = b"abc"."""
    folder = tmp_path / "mirror"
    folder.mkdir()
    (folder / "data.bin").write_bytes(b"abc")
    monkeypatch.setenv(URL_ENV, folder.as_uri())
    return folder


def fetch(tmp_path, checksum, verify=True):
    remote = RemoteFile("data.bin", "http://unused.invalid/", checksum=checksum)
    return download(remote, tmp_path / "downloads" / "data.bin", URL_ENV, False, "use --from", verify=verify)


@pytest.mark.parametrize("checksum", [f"md5:{MD5_ABC}", f"sha256:{SHA256_ABC}", f"md5:{MD5_ABC.upper()}"])
def test_a_file_with_its_published_checksum_is_kept(tmp_path, mirror, checksum):
    assert fetch(tmp_path, checksum).read_bytes() == b"abc"


def test_a_mismatch_deletes_the_file_in_one_line(tmp_path, mirror):
    wrong = "0" * 32
    with pytest.raises(PrepareError) as raised:
        fetch(tmp_path, f"md5:{wrong}")
    message = str(raised.value)
    assert raised.value.exit_code == 2 and "\n" not in message
    assert f"data.bin from {mirror.as_uri()}/data.bin is damaged or not the published file: md5 {MD5_ABC}, " \
           f"published {wrong}; it is deleted" in message
    assert list((tmp_path / "downloads").iterdir()) == []  # neither data.bin nor data.bin.part


def test_a_damaged_earlier_download_is_not_reused(tmp_path, mirror):
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "data.bin").write_bytes(b"abd")  # one byte off
    with pytest.raises(PrepareError, match=r"from an earlier download .* is damaged"):
        fetch(tmp_path, f"md5:{MD5_ABC}")
    assert fetch(tmp_path, f"md5:{MD5_ABC}").read_bytes() == b"abc"  # the next run downloads it again


def test_no_published_checksum_is_said_and_no_checksum_skips_the_check(tmp_path, mirror, caplog):
    with caplog.at_level(logging.INFO, logger="msretrieval.data.download"):
        assert fetch(tmp_path, None).read_bytes() == b"abc"
    assert "data.bin: its source publishes no checksum; not verified" in caplog.messages
    (tmp_path / "downloads" / "data.bin").unlink()
    assert fetch(tmp_path, "md5:" + "0" * 32, verify=False).read_bytes() == b"abc"


def test_flowers_checksums_are_the_published_ones():
    """The MD5s prepare_flowers102.py checks equal the ones torchvision's Flowers102 downloader checks."""
    import importlib.util
    from pathlib import Path

    torchvision_flowers = pytest.importorskip("torchvision.datasets.flowers102")
    script = Path(__file__).resolve().parents[2] / "scripts" / "prepare_flowers102.py"
    spec = importlib.util.spec_from_file_location("prepare_flowers102", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    published = dict(torchvision_flowers.Flowers102._file_dict.values())
    assert module.CHECKSUMS == {name: f"md5:{published[name]}" for name in (module.ARCHIVE, module.LABELS_MAT)}
