"""The public surface: exactly the names in __all__, each documented; optional backends stay optional."""

from __future__ import annotations

import subprocess
import sys

import cio_sync


def test_all_lists_exactly_the_public_names() -> None:
    public = {name for name in dir(cio_sync) if not name.startswith("_")}
    # Submodules: the command line, the sink authors' test kit, and the layer packages (docs/architecture.md).
    modules = {"cli", "serve", "asgi", "testing", "schemas", "intake", "formats", "storage", "buffer", "publish",
               "workspace", "sinks", "loader", "nats"}
    assert public - modules == set(cio_sync.__all__) - {"__version__"}


def test_every_public_name_has_a_docstring() -> None:
    for name in cio_sync.__all__:
        obj = getattr(cio_sync, name)
        if callable(obj):
            assert obj.__doc__, f"cio_sync.{name} has no docstring"


def test_errors_subclass_the_matching_builtins() -> None:
    assert issubclass(cio_sync.InvalidCall, ValueError)
    assert issubclass(cio_sync.InvalidCall, cio_sync.CioSyncError)
    assert issubclass(cio_sync.StorageError, OSError)
    assert issubclass(cio_sync.PublishConflict, FileExistsError)
    assert issubclass(cio_sync.ConfigError, ValueError)
    assert issubclass(cio_sync.MissingBackend, ImportError)
    assert issubclass(cio_sync.InvalidFile, ValueError)
    assert issubclass(cio_sync.InvalidFile, cio_sync.CioSyncError)
    assert issubclass(cio_sync.StateError, RuntimeError)
    assert issubclass(cio_sync.BufferFull, TimeoutError)
    assert issubclass(cio_sync.SinkClosed, RuntimeError)
    assert issubclass(cio_sync.UnknownPerson, LookupError)
    for name in cio_sync.__all__:
        error = getattr(cio_sync, name)
        if isinstance(error, type) and issubclass(error, cio_sync.CioSyncError) and error is not cio_sync.CioSyncError:
            builtin = [b for b in error.__mro__ if b.__module__ == "builtins" and b not in (Exception, BaseException,
                                                                                             object)]
            assert builtin, f"cio_sync.{name} subclasses no builtin error but Exception"


def test_importing_cio_sync_needs_no_cloud_backend() -> None:
    code = (
        "import sys\n"
        "for name in ('s3fs', 'gcsfs', 'adlfs', 'duckdb'):\n"
        "    sys.modules[name] = None\n"
        "import cio_sync\n"
        "sink = cio_sync.AdvancedSink('memory://x/y', flush_interval=None)\n"
        "sink.write({'type': 'track', 'userId': '1', 'event': 'E'})\n"
        "print(len(sink.close()))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "1"
