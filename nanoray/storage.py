"""Where a run's files live, and how a file or directory is written so that a crash never leaves half of it.

    store = RunStore("runs/sweeps")                  # a local directory (made absolute) or s3://bucket/prefix
    store.train_run("miniseries-d12")                # .../train/miniseries-d12: one Ray Train run
    store.latest_checkpoint("miniseries-d12")        # the ray.train.Checkpoint a restart resumes from, or None
    store.data_dir("stdlib")                         # .../data/stdlib: prepared shards and tokenizer
    with atomic_dir("runs/x/ckpt") as tmp: ...       # written in tmp, fsynced, renamed into place

Layout under a storage root (the `--storage` of the jobs, `storage_path` of Ray Train and Tune):

    <sweep>/           Tune's experiment, one per sweep name (the key a re-run resumes); its <trial>/ folders
                       also hold each trial's TensorBoard events and W&B run (nanoray.trackers)
    <sweep>/report/    the trackers' family-level run of a sweep: its report in TensorBoard, its W&B run
    mlflow/            MLflow's file store (nanoray.trackers), unless MLFLOW_TRACKING_URI names another
    train/<run>/       one Ray Train run: its checkpoint_*/ directories and Train's snapshot
    data/<source>/     a corpus prepared once: shards/{train,val}/ (+ manifest.json) and tokenizer-<vocab>/
    reports/<sweep>/   a sweep's report, where the jobs put it when the root is an object store

Nothing else in nanoray joins these paths. A local root is made absolute, since trial drivers and Ray Data
actors run in other working directories. Train reports checkpoint paths inside the storage's filesystem
without the scheme (`bucket/prefix/...` for s3://bucket/prefix); `uri()` gives the scheme back.
"""

import contextlib
import os
import re
import shutil
import tempfile
import time
import urllib.parse
from pathlib import Path

import pyarrow.fs as pafs

SNAPSHOT_RETRIES = 20  # Train rewrites its checkpoint snapshot in place: a reader may catch it half-written


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it for a URI (s3://..., gs://..., file://...) or a local path.
    S3 takes its endpoint and credentials from the standard AWS environment (AWS_ENDPOINT_URL, AWS_PROFILE...);
    s3://anonymous@bucket/... reads a public bucket unsigned."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme == "s3" and parts.username == "anonymous":
        bucket = parts.hostname
        region = urllib.parse.parse_qs(parts.query).get("region", [None])[0] or pafs.resolve_s3_region(bucket)
        return pafs.S3FileSystem(anonymous=True, region=region), f"{bucket}{parts.path}".rstrip("/")
    return pafs.FileSystem.from_uri(uri)


def join(uri: str, *parts: str) -> str:
    """A location under `uri` (a local path or a URI)."""
    return "/".join([uri.rstrip("/"), *parts]) if "://" in uri else os.path.join(uri, *parts)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    """A whole file (local path or URI); FileNotFoundError names it."""
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: no such file") from None
    except OSError as e:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{uri}: no such file") from None
        raise OSError(f"{uri}: {e}") from e


def write_bytes(uri: str, data: bytes | str) -> None:
    """A whole file, atomically: a rename for a local path, one PUT for an object store."""
    if "://" not in uri:
        atomic_write(uri, data)
        return
    fs, path = filesystem(uri)
    with fs.open_output_stream(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def upload(local_dir: str | os.PathLike, uri: str) -> None:
    """Copy a local directory's files to `uri` (a directory in an object store or a local path)."""
    fs, path = filesystem(uri)
    pafs.copy_files(str(local_dir), path, destination_filesystem=fs)


class StorageError(ValueError):
    """A storage root that cannot be used; the message names it and says why."""


def check_writable(root: str) -> None:
    """Raise StorageError, naming `root` and the reason, unless a file can be written and deleted under it: an
    unreachable endpoint, a bucket that does not exist, missing or refused credentials all stop here, before
    any work is done."""
    try:
        fs, path = filesystem(root)
    except (OSError, ValueError) as e:  # a malformed URI, an unknown scheme
        raise StorageError(f"{root}: not a storage location pyarrow can open ({e})") from None
    probe = f"{path.rstrip('/')}/.nanoray-probe-{os.getpid()}"  # a directory and a file in it, as uploads write
    made = _first_missing(fs, path) or probe  # what the probe creates, removed again: a check writes nothing
    try:
        if "://" in root and not root.startswith("file://"):  # an object store: its bucket first
            bucket = path.split("/")[0]
            if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise StorageError(f"{root}: the bucket {bucket!r} does not exist (create it, or name another)")
        fs.create_dir(probe, recursive=True)
        with fs.open_output_stream(f"{probe}/file") as f:
            f.write(b"nanoray")
        fs.delete_dir(made)
    except StorageError:
        raise
    except OSError as e:
        reason = str(e)
        if "ACCESS_DENIED" in reason or "AccessDenied" in reason or "credentials" in reason.lower():
            reason = ("access denied: no credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
                      f"or the node's instance role), or they may not write there ({reason})")
        elif "NETWORK_CONNECTION" in reason or "connect" in reason.lower():
            endpoint = os.environ.get("AWS_ENDPOINT_URL", "the provider's endpoint")
            reason = f"cannot reach the object store at {endpoint} ({reason})"
        raise StorageError(f"{root}: cannot write there: {reason}") from None


def _first_missing(fs: pafs.FileSystem, path: str) -> str | None:
    """The outermost directory of a local `path` that does not exist yet (None when it all exists, or on an
    object store, where directories are only key prefixes)."""
    if not isinstance(fs, pafs.LocalFileSystem):
        return None
    missing = None
    for parent in [path, *map(str, Path(path).parents)]:
        if fs.get_file_info(parent).type != pafs.FileType.NotFound:
            return missing
        missing = parent
    return missing


def download(uri: str, local_dir: str | os.PathLike) -> None:
    """Copy the files under `uri` (a directory in an object store) into the local directory `local_dir`."""
    fs, path = filesystem(uri)
    pafs.copy_files(path, str(local_dir), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def slug(name: str) -> str:
    """A name safe as one path component ("hf:org/name" -> "hf-org-name")."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


class RunStore:
    """The locations of everything a sweep or a training run keeps, under one storage root."""

    def __init__(self, root: str | os.PathLike):
        root = str(root)
        # file:///mnt/x names a local path that the user says every node shares (an NFS mount, say)
        self.shared = root.startswith("file://") or ("://" in root)
        root = root.removeprefix("file://")
        self.scheme = root.split("://")[0] if "://" in root else None
        self.root = root.rstrip("/") if self.scheme else os.path.abspath(root)

    def __repr__(self) -> str:
        return f"RunStore({self.root!r})"

    @property
    def is_local(self) -> bool:
        """Whether the root is a directory of this machine's filesystem (file:// ones included), not an object
        store."""
        return self.scheme is None

    def join(self, *parts: str) -> str:
        return join(self.root, *parts)

    def sweep_dir(self, sweep: str) -> str:
        """Tune's experiment directory of sweep `sweep`."""
        return self.join(sweep)

    def family_dir(self, sweep: str) -> str:
        """The trackers' files of sweep `sweep` as a whole (beside its trials' folders, which Tune fills)."""
        return self.join(sweep, "report")

    @property
    def mlflow_uri(self) -> str | None:
        """MLflow's file store under a local root; None under an object store, where MLflow cannot keep one."""
        return None if self.scheme else "file://" + self.join("mlflow")

    @property
    def train_root(self) -> str:
        """Ray Train's storage_path: every run a directory under it."""
        return self.join("train")

    def train_run(self, run: str) -> str:
        return self.join("train", run)

    def data_dir(self, source: str) -> str:
        """Where `source` is prepared: its shards (for sources that are not parquet already) and tokenizers."""
        return self.join("data", slug(source))

    def uri(self, path: str | None) -> str | None:
        """A location Train reported (inside the storage's filesystem, without the scheme) as a URI anyone
        can open; local paths and URIs come back as they are."""
        if path is None or self.scheme is None or "://" in path:
            return path
        return f"{self.scheme}://{path}"

    def latest_checkpoint(self, run: str):
        """The latest checkpoint that Ray Train has registered for run `run` (a ray.train.Checkpoint), or None
        when there is no run there yet or it has none. Train rewrites its snapshot file in place, so a reader
        that catches it half-written tries again."""
        import ray.train  # Ray starts nothing here, but costs a second to import: only where a run is read
        from ray.train.v2._internal.exceptions import CheckpointManagerInitializationError

        for attempt in range(SNAPSHOT_RETRIES):
            try:
                return ray.train.Result.from_path(self.train_run(run)).checkpoint
            except CheckpointManagerInitializationError:
                if attempt == SNAPSHOT_RETRIES - 1:
                    raise
                time.sleep(0.05)
            except (RuntimeError, FileNotFoundError):  # no run there yet
                return None


# ---------------------------------------------------------------------------------------------------
# Atomic writes (local files)


def fsync(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike):
    """Yield a temp path beside `path` to write; when the block ends without an error the file is fsynced and
    renamed to `path` (readers see the old file or the new one, never half); on an error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        fsync(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write `data` to `path` atomically (atomic_file)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def old_name(path: Path) -> Path:
    """Where atomic_dir keeps the directory it replaces until the new one is in place."""
    return path.with_name(f".{path.name}.old")


def recover(path: str | os.PathLike, marker: str) -> Path:
    """A directory that a crash caught between atomic_dir's two renames is still whole under its old name
    (holding `marker`): put it back."""
    path = Path(path)
    old = old_name(path)
    if not path.exists() and (old / marker).exists():
        os.replace(old, path)
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = True):
    """Yield a temp directory beside `path`; when the block ends without an error its files are fsynced and it
    is renamed to `path`. An existing `path` is replaced (moved aside first, so a whole one is always on disk),
    or, with replace=False, kept (another process finished first) and ours dropped. On an error nothing of the
    temp directory is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        for f in [*tmp.rglob("*"), tmp]:  # on disk before the rename makes them `path`
            if f.is_file() or f.is_dir():
                fsync(f)
        old = None
        if path.exists():
            if not replace:
                return
            old = old_name(path)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            if replace or not path.exists():
                raise
            return  # another process renamed its copy into place between our check and our rename
        fsync(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
