"""Where a run database lives: an SQLite file (the embedded default) or a PostgreSQL server.

``--db`` takes either a file path or a SQLAlchemy URL. Only the two dialects the store is
tested on are accepted, so a typo fails at start-up rather than deep inside a migration.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from batch_runner.errors import ConfigError

#: What ``--db`` holds: an SQLite file, or a database URL as the user wrote it.
DbLocation = Path | str

SQLITE_DRIVER = "sqlite"
POSTGRES_DRIVER = "postgresql+asyncpg"


@dataclass(frozen=True)
class Database:
    url: URL

    @property
    def shared(self) -> bool:
        """Whether several runners may work this database at once (a server, not a file)."""
        return self.url.get_backend_name() == "postgresql"

    @property
    def path(self) -> Path | None:
        """The SQLite file, or None for a server."""
        if self.shared or self.url.database is None:
            return None
        return Path(self.url.database)

    def __str__(self) -> str:
        # Messages and logs show the file, or the URL without its password.
        return str(self.path) if self.path is not None else self.url.render_as_string()


def location(text: str) -> DbLocation:
    """A ``--db`` value as given: URLs stay text (a Path would fold their ``//``)."""
    return text if "://" in text else Path(text)


def database(value: DbLocation | Database) -> Database:
    """Parse ``--db``: a path is an SQLite file; ``postgresql+asyncpg://…`` is a server."""
    if isinstance(value, Database):
        return value
    text = str(value)
    if "://" not in text:
        return Database(URL.create(SQLITE_DRIVER, database=str(Path(text).absolute())))
    try:
        url = make_url(text)
    except ArgumentError:
        raise ConfigError(f"--db {text!r} is neither a file path nor a database URL") from None
    backend = url.get_backend_name()
    if backend == "postgresql":
        # The store is asynchronous: whatever driver the URL names, asyncpg talks to the server.
        return Database(url.set(drivername=POSTGRES_DRIVER))
    if backend == "sqlite":
        if not url.database:
            raise ConfigError("--db: an SQLite URL needs a file (sqlite:///path/run.sqlite)")
        return Database(URL.create(SQLITE_DRIVER, database=str(Path(url.database).absolute())))
    raise ConfigError(
        f"--db: {backend} is not supported; give an SQLite file path or a "
        "postgresql+asyncpg://USER:PASSWORD@HOST:PORT/DATABASE URL"
    )
