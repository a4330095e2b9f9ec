"""cxr_ray.io.storage against real local files and a real S3 API (moto server on loopback)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cxr_ray.errors import DecodeError, UsageError
from cxr_ray.io import storage
from cxr_ray.io.storage import (
    InputNotFoundError,
    expand_inputs,
    get_filesystem,
    is_remote,
    open_output,
    read_bytes,
    to_pyarrow_filesystem,
)

# ----------------------------------------------------------------------------- helpers


def _touch(root, relative: str, data: bytes = b"x") -> str:
    path = os.path.join(str(root), relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)
    return path


@pytest.fixture()
def local_tree(tmp_path):
    root = tmp_path / "archive"
    for relative in [
        "p1/a.dcm",
        "p1/b.PNG",
        "p1/noext",
        "p2/c.jpg",
        "p2/sub/d.dcm",
        "top.png",
        ".hidden.png",
        ".cache/e.png",
        "p2/_SUCCESS",
    ]:
        _touch(root, relative)
    os.makedirs(root / "empty_dir")
    return root


def _s3_client(endpoint):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def _put_many(endpoint, bucket, items: dict[str, bytes]) -> None:
    client = _s3_client(endpoint)
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda kv: client.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), items.items()))


# ----------------------------------------------------------------------------- addressing


def test_is_remote_and_get_filesystem(tmp_path, monkeypatch):
    assert is_remote("s3://bucket/key")
    assert not is_remote("/tmp/x") and not is_remote("relative/x") and not is_remote("file:///tmp/x")
    monkeypatch.chdir(tmp_path)
    fs, path = get_filesystem("rel/file.png")
    assert path == str(tmp_path / "rel" / "file.png") and "file" in fs.protocol
    fs, path = get_filesystem("file:///tmp/x.png")
    assert path == "/tmp/x.png"
    fs, path = get_filesystem("s3://bucket/some/prefix/", s3_endpoint="http://127.0.0.1:1")
    assert path == "bucket/some/prefix" and "s3" in fs.protocol
    with pytest.raises(UsageError, match="no filesystem"):
        get_filesystem("nosuchscheme://x/y")


def test_join():
    assert storage.join("s3://b/out/", "run", "part.parquet") == "s3://b/out/run/part.parquet"
    assert storage.join("/tmp/out", "a") == os.path.join("/tmp/out", "a")


# ----------------------------------------------------------------------------- local expansion


def test_local_directory_recursive_sorted_skips_hidden(local_tree):
    got = list(expand_inputs(str(local_tree)))
    rel = [os.path.relpath(p, local_tree) for p in got]
    assert rel == ["p1/a.dcm", "p1/b.PNG", "p1/noext", "p2/c.jpg", "p2/sub/d.dcm", "top.png"]
    assert all(os.path.isabs(p) for p in got)


def test_local_extension_filter_case_insensitive_and_no_extension(local_tree):
    rel = lambda paths: [os.path.relpath(p, local_tree) for p in paths]  # noqa: E731
    assert rel(expand_inputs(local_tree, extensions={".png"})) == ["p1/b.PNG", "top.png"]
    assert rel(expand_inputs(local_tree, extensions={"dcm", ""})) == ["p1/a.dcm", "p1/noext", "p2/sub/d.dcm"]


def test_local_single_file_and_sequence(local_tree, monkeypatch):
    monkeypatch.chdir(local_tree)
    got = list(expand_inputs(["top.png", str(local_tree / "p2")]))
    assert got == [str(local_tree / "top.png"), str(local_tree / "p2/c.jpg"), str(local_tree / "p2/sub/d.dcm")]


def test_local_empty_directory_yields_nothing(local_tree):
    assert list(expand_inputs(local_tree / "empty_dir")) == []


def test_local_globs(local_tree):
    rel = lambda spec, **kw: [os.path.relpath(p, local_tree) for p in expand_inputs(str(local_tree / spec), **kw)]  # noqa: E731
    assert rel("*.png") == ["top.png"]  # hidden files are not matched by *
    assert rel("**/*.dcm") == ["p1/a.dcm", "p2/sub/d.dcm"]
    assert rel("p*/*.jpg") == ["p2/c.jpg"]
    # a glob that matches directories yields everything below them
    assert rel("p?") == ["p1/a.dcm", "p1/b.PNG", "p1/noext", "p2/c.jpg", "p2/sub/d.dcm"]
    assert rel("p?", extensions={".dcm"}) == ["p1/a.dcm", "p2/sub/d.dcm"]
    with pytest.raises(InputNotFoundError, match="no files match"):
        list(expand_inputs(str(local_tree / "*.tiff")))


def test_missing_local_path_raises_typed_error(tmp_path):
    gen = expand_inputs(str(tmp_path / "nope"))  # lazy: nothing raised yet
    with pytest.raises(InputNotFoundError, match="input not found") as info:
        list(gen)
    assert isinstance(info.value, UsageError) and isinstance(info.value, FileNotFoundError)
    assert "nope" in str(info.value)
    with pytest.raises(InputNotFoundError):
        list(expand_inputs(str(tmp_path / "missing.csv")))


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_local_manifest_resolves_relative_paths(local_tree, tmp_path, kind):
    manifest_dir = local_tree / "manifests"
    manifest_dir.mkdir()
    table = pd.DataFrame(
        {
            "label": ["covid", "normal", "normal", "x", "y"],
            "path": ["../p1/a.dcm", "../top.png", str(local_tree / "p2/c.jpg"), "s3://bucket/k.dcm", "sub/../../p1/noext"],
        }
    )
    manifest = manifest_dir / f"m.{kind}"
    if kind == "csv":
        table.to_csv(manifest, index=False)
    else:
        table.to_parquet(manifest, index=False)
    got = list(expand_inputs(str(manifest)))
    assert got == [
        str(local_tree / "p1/a.dcm"),
        str(local_tree / "top.png"),
        str(local_tree / "p2/c.jpg"),
        "s3://bucket/k.dcm",
        str(local_tree / "p1/noext"),
    ]


def test_manifest_without_path_column(tmp_path):
    manifest = tmp_path / "bad.csv"
    manifest.write_text("file,label\na.png,covid\n")
    with pytest.raises(UsageError, match="no 'path' column"):
        list(expand_inputs(str(manifest)))


def test_large_csv_manifest_is_read_in_batches(tmp_path):
    manifest = tmp_path / "big.csv"
    n = 60_000  # larger than pyarrow's default CSV block: several batches
    with open(manifest, "w") as handle:
        handle.write("path,label\n")
        handle.writelines(f"img/{i:06d}.png,normal\n" for i in range(n))
    got = expand_inputs(str(manifest))
    assert next(got) == str(tmp_path / "img/000000.png")
    rest = list(got)
    assert len(rest) == n - 1 and rest[-1] == str(tmp_path / f"img/{n - 1:06d}.png")


# ----------------------------------------------------------------------------- reading / writing locally


def test_read_bytes_local(local_tree):
    path = _touch(local_tree, "big.bin", b"0123456789")
    assert read_bytes(path) == b"0123456789"
    assert read_bytes(path, max_bytes=10) == b"0123456789"
    with pytest.raises(DecodeError) as info:
        read_bytes(path, max_bytes=9)
    assert info.value.code == "too_large"
    with pytest.raises(FileNotFoundError):
        read_bytes(str(local_tree / "nope.png"))


def test_every_folder_entry_is_listed_even_when_it_cannot_be_read(tmp_path):
    """46 files + a dangling symlink + a FIFO: 48 inputs, and the two odd ones fail on read, quickly."""
    root = tmp_path / "archive"
    for i in range(46):
        _touch(root, f"p{i % 3}/{i:02d}.png")
    os.symlink(str(root / "gone.png"), str(root / "p0" / "dangling.png"))
    os.mkfifo(str(root / "p1" / "pipe.dcm"))
    listed = list(expand_inputs(str(root)))
    assert len(listed) == 48
    with pytest.raises(FileNotFoundError):
        read_bytes(str(root / "p0" / "dangling.png"), max_bytes=100)
    with pytest.raises(OSError, match="not a regular file"):  # a FIFO would block an open() forever
        read_bytes(str(root / "p1" / "pipe.dcm"), max_bytes=100)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file: permission errors cannot be provoked")
def test_an_unlistable_sub_folder_is_one_input_that_fails_with_its_permission_error(tmp_path):
    root = tmp_path / "archive"
    _touch(root, "ok.png")
    locked = root / "locked"
    _touch(root, "locked/secret.png")
    locked.chmod(0)
    try:
        listed = list(expand_inputs(str(root)))
        assert listed == [str(locked), str(root / "ok.png")]
        with pytest.raises(PermissionError):
            read_bytes(str(locked))
    finally:
        locked.chmod(0o755)


def test_open_output_local_creates_dirs_and_is_atomic(tmp_path):
    target = tmp_path / "a" / "b" / "out.json"
    with open_output(str(target), "w") as handle:
        handle.write('{"ok": true}')
    assert target.read_text() == '{"ok": true}'
    with pytest.raises(RuntimeError), open_output(str(tmp_path / "a" / "fail.bin")) as handle:
        handle.write(b"partial")
        raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path / "a")) == ["b"]  # no file, no temp file left behind
    with pytest.raises(UsageError):
        open_output(str(target), "rb").__enter__()


# ----------------------------------------------------------------------------- S3


def test_s3_listing_streams_pages_across_1000_keys(s3_bucket, monkeypatch):
    endpoint, bucket = s3_bucket
    n = 1205
    items = {f"archive/p{i % 7}/img_{i:05d}.dcm": b"d" for i in range(n)}
    items.update(
        {
            "archive/.hidden": b"h",
            "archive/p1/.DS_Store": b"h",
            "archive/.cache/x.dcm": b"h",
            "archive/_SUCCESS": b"",
            "archive/dirmarker/": b"",
            "archive/notes.txt": b"t",
            "archive-sibling/other.dcm": b"s",  # shares the string prefix but not the folder
        }
    )
    _put_many(endpoint, bucket, items)

    fs, _ = get_filesystem(f"s3://{bucket}", s3_endpoint=endpoint)
    calls = []
    real_call = fs._call_s3

    async def counting_call(method, *args, **kwargs):
        if method == "list_objects_v2" and kwargs.get("Delimiter") == "":
            calls.append(kwargs.get("ContinuationToken"))  # one flat listing page
        return await real_call(method, *args, **kwargs)

    monkeypatch.setattr(fs, "_call_s3", counting_call)
    gen = expand_inputs(f"s3://{bucket}/archive", s3_endpoint=endpoint)
    first = next(gen)
    assert len(calls) == 1, "the first key must come before the second page is fetched"
    got = [first, *gen]
    assert len(calls) == 2 and calls[0] is None and calls[1]
    expected = sorted(f"s3://{bucket}/{k}" for k in items if k.startswith("archive/p") and ".DS" not in k)
    expected.append(f"s3://{bucket}/archive/notes.txt")
    assert sorted(got) == sorted(expected)
    assert len(got) == n + 1
    assert got[:1000] == sorted(got[:1000]) and got[1000:] == sorted(got[1000:])

    only_dcm = list(expand_inputs(f"s3://{bucket}/archive/", s3_endpoint=endpoint, extensions={".dcm"}))
    assert len(only_dcm) == n


def test_s3_single_object_bucket_root_and_missing(s3_bucket):
    endpoint, bucket = s3_bucket
    _put_many(endpoint, bucket, {"a/x.png": b"1", "b.dcm": b"2"})
    assert list(expand_inputs(f"s3://{bucket}/a/x.png", s3_endpoint=endpoint)) == [f"s3://{bucket}/a/x.png"]
    assert list(expand_inputs(f"s3://{bucket}", s3_endpoint=endpoint)) == [
        f"s3://{bucket}/a/x.png",
        f"s3://{bucket}/b.dcm",
    ]
    with pytest.raises(InputNotFoundError, match="input not found"):
        list(expand_inputs(f"s3://{bucket}/nothing-here", s3_endpoint=endpoint))
    for spec in ("s3://no-such-bucket-here/x", "s3://no-such-bucket-here", "s3://no-such-bucket-here/*.dcm"):
        with pytest.raises(InputNotFoundError):
            list(expand_inputs(spec, s3_endpoint=endpoint))


def test_s3_endpoint_from_environment(s3_bucket, monkeypatch):
    endpoint, bucket = s3_bucket
    _put_many(endpoint, bucket, {"k/one.png": b"1"})
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    assert list(expand_inputs(f"s3://{bucket}/k")) == [f"s3://{bucket}/k/one.png"]
    assert read_bytes(f"s3://{bucket}/k/one.png") == b"1"


def test_s3_globs(s3_bucket):
    endpoint, bucket = s3_bucket
    keys = ["data/p1/img_1.dcm", "data/p1/img_2.png", "data/p2/img_3.dcm", "data/p2/deep/img_4.dcm", "other/img_5.dcm"]
    _put_many(endpoint, bucket, dict.fromkeys(keys, b"x"))
    glob = lambda pattern, **kw: list(expand_inputs(f"s3://{bucket}/{pattern}", s3_endpoint=endpoint, **kw))  # noqa: E731
    assert glob("data/*/img_*.dcm") == [f"s3://{bucket}/data/p1/img_1.dcm", f"s3://{bucket}/data/p2/img_3.dcm"]
    assert glob("**/*.dcm") == [f"s3://{bucket}/{k}" for k in sorted(keys) if k.endswith(".dcm")]
    assert glob("data/p[2]") == [f"s3://{bucket}/data/p2/deep/img_4.dcm", f"s3://{bucket}/data/p2/img_3.dcm"]
    with pytest.raises(InputNotFoundError):
        glob("data/*.jpg")
    with pytest.raises(UsageError, match="bucket name"):
        list(expand_inputs("s3://cxr-*/x", s3_endpoint=endpoint))


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_s3_manifest(s3_bucket, kind):
    endpoint, bucket = s3_bucket
    table = pd.DataFrame({"path": ["img/a.dcm", "../up.png", "s3://elsewhere/z.dcm"], "label": ["covid", "normal", "x"]})
    body = table.to_csv(index=False).encode() if kind == "csv" else table.to_parquet(index=False)
    _put_many(endpoint, bucket, {f"sets/m.{kind}": body})
    got = list(expand_inputs(f"s3://{bucket}/sets/m.{kind}", s3_endpoint=endpoint))
    assert got == [f"s3://{bucket}/sets/img/a.dcm", f"s3://{bucket}/up.png", "s3://elsewhere/z.dcm"]


def test_s3_read_bytes_and_write(s3_bucket):
    endpoint, bucket = s3_bucket
    payload = bytes(range(256)) * 10
    with open_output(f"s3://{bucket}/out/run1/blob.bin", "wb", s3_endpoint=endpoint) as handle:
        handle.write(payload)
    with open_output(f"s3://{bucket}/out/run1/summary.json", "w", s3_endpoint=endpoint) as handle:
        handle.write('{"n": 1, "é": true}')
    assert read_bytes(f"s3://{bucket}/out/run1/blob.bin", s3_endpoint=endpoint) == payload
    body = _s3_client(endpoint).get_object(Bucket=bucket, Key="out/run1/summary.json")["Body"].read()
    assert body.decode("utf-8") == '{"n": 1, "é": true}'
    with pytest.raises(DecodeError) as info:
        read_bytes(f"s3://{bucket}/out/run1/blob.bin", s3_endpoint=endpoint, max_bytes=100)
    assert info.value.code == "too_large"
    with pytest.raises(FileNotFoundError):
        read_bytes(f"s3://{bucket}/out/missing.bin", s3_endpoint=endpoint)

    # a failing block leaves nothing behind
    with pytest.raises(RuntimeError), open_output(f"s3://{bucket}/out/run1/bad.bin", s3_endpoint=endpoint) as handle:
        handle.write(b"half")
        raise RuntimeError("boom")
    listed = _s3_client(endpoint).list_objects_v2(Bucket=bucket, Prefix="out/")
    assert sorted(o["Key"] for o in listed["Contents"]) == ["out/run1/blob.bin", "out/run1/summary.json"]


def test_pyarrow_filesystem_writes_parquet_to_s3_and_local(s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    fs, path = get_filesystem(f"s3://{bucket}/pq/part-0.parquet", s3_endpoint=endpoint)
    table = pa.table({"path": ["a", "b"], "score": [0.1, 0.9]})
    pq.write_table(table, path, filesystem=to_pyarrow_filesystem(fs))
    assert pq.read_table(path, filesystem=to_pyarrow_filesystem(fs)).equals(table)
    local_fs, local_path = get_filesystem(str(tmp_path / "t.parquet"))
    pq.write_table(table, local_path, filesystem=to_pyarrow_filesystem(local_fs))
    assert pq.read_table(str(tmp_path / "t.parquet")).equals(table)
