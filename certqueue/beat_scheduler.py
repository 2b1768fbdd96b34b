"""RedBeat, made to notice when Redis lost beat's schedule.

RedBeat keeps the schedule in Redis (one hash per entry, a sorted set of due times) and writes
the static entries once, at start. A Redis that comes back empty (a restart without persistence,
a failover to a replica that had not caught up, a flush) usually also loses beat's lock, and beat
then exits on its next tick (``LockNotOwnedError``) and its supervisor starts it again, which
writes the entries again. But when the loss falls between writing the entries and taking the
lock (Redis restarted while beat was starting: redis-py retries the lock until Redis is back),
beat holds a fresh lock over an empty schedule: it ticks for ever and sends nothing, no dispatch,
no scan, no reconcile. The chaos suite's Redis restart caught exactly that on a slow machine
(every certificate left REQUESTED).

So each tick first checks, in one pipelined round trip, that every static entry is still in
Redis, and when any is missing writes the schedule again as RedBeat does at start (a lost entry
has no last run: it is due at once, and every periodic task is safe to run early).
"""

from __future__ import annotations

import logging
from typing import Any

from redbeat.schedulers import RedBeatScheduler, get_redis

log = logging.getLogger(__name__)


class Scheduler(RedBeatScheduler):  # type: ignore[misc]
    def tick(self, min: Any = min, **kwargs: Any) -> float:
        self.restore_lost_entries()
        interval: float = super().tick(min=min, **kwargs)
        return interval

    def restore_lost_entries(self) -> list[str]:
        """The static entries missing from Redis, written again; returns their names."""
        conf = self.app.redbeat_conf
        names = sorted(conf.schedule)
        if not names:
            return []
        client = get_redis(self.app)
        with client.pipeline(transaction=False) as pipe:
            for name in names:
                key = self.Entry.generate_key(self.app, name)
                pipe.zscore(conf.schedule_key, key)
                pipe.exists(key)
            found = pipe.execute()
        lost = [name for i, name in enumerate(names) if found[2 * i] is None or not found[2 * i + 1]]
        if lost:
            log.warning(
                "beat: %d schedule entr%s missing from Redis (%s): Redis lost them; writing them again",
                len(lost),
                "y" if len(lost) == 1 else "ies",
                ", ".join(lost),
            )
            self.setup_schedule()  # RedBeat's own start-up write: each entry's last run kept where known
        return lost
