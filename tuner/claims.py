"""Which worker measures which variant of a shared study: claims taken atomically in a database.

Several tuner workers (one per GPU, or on several machines) run the same Optuna study. Optuna's samplers
can hand two of them the same point at about the same time, and its storages have no compare-and-set, so
each worker claims a variant before measuring it: one row per (study, variant key), inserted under the
table's primary key, so exactly one insert succeeds. A claim whose holder trial died (its heartbeat went
stale and Optuna failed it without a measurement) is taken over by the worker that retries it, through an
update conditioned on the old holder (again exactly one wins).

The claims live in the study storage's own database (an RDB URL such as ``postgresql+psycopg2://...``), or
for a journal-file storage in a SQLite file beside the journal (workers on one machine).
"""

from __future__ import annotations

from typing import Callable

import sqlalchemy as sa

TABLE = "flash_mla_claims"


class Claims:
    def __init__(self, url: str):
        kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
        self.engine = sa.create_engine(url, **kwargs)
        meta = sa.MetaData()
        self.table = sa.Table(TABLE, meta,
                              sa.Column("study", sa.String(512), primary_key=True),
                              sa.Column("variant_key", sa.String(256), primary_key=True),
                              sa.Column("trial_number", sa.Integer, nullable=False))
        try:
            meta.create_all(self.engine)
        except sa.exc.SQLAlchemyError:          # another worker created it at the same moment
            meta.create_all(self.engine)

    @classmethod
    def for_storage(cls, spec: str) -> "Claims":
        """The claims of a study storage given as on the command line: an RDB URL or a journal file path."""
        return cls(spec if "://" in spec else f"sqlite:///{spec}.claims.sqlite")

    def claim(self, study: str, variant_key: str, trial_number: int, holder_is_dead: Callable[[int], bool]) -> bool:
        """True if this trial may measure the variant: its claim is new, already its own, or taken over from a
        holder trial that ``holder_is_dead(number)`` says died without measuring."""
        t = self.table
        try:
            with self.engine.begin() as c:
                c.execute(t.insert().values(study=study, variant_key=variant_key, trial_number=trial_number))
            return True
        except sa.exc.IntegrityError:
            pass
        with self.engine.begin() as c:
            holder = c.execute(sa.select(t.c.trial_number).where(t.c.study == study,
                                                                t.c.variant_key == variant_key)).scalar_one()
        if holder == trial_number:
            return True
        if not holder_is_dead(holder):
            return False
        with self.engine.begin() as c:
            r = c.execute(t.update().where(t.c.study == study, t.c.variant_key == variant_key,
                                           t.c.trial_number == holder).values(trial_number=trial_number))
        return r.rowcount == 1

    def holders(self, study: str) -> dict[str, int]:
        t = self.table
        with self.engine.begin() as c:
            return dict(c.execute(sa.select(t.c.variant_key, t.c.trial_number).where(t.c.study == study)).all())

    def close(self) -> None:
        self.engine.dispose()
