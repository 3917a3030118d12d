"""One leader among replicas sharing a store: a lease row with a fencing token (its epoch).

Every replica calls :meth:`Lease.claim` every ``ttl_s / 3`` seconds. The holder extends the row's expiry;
anyone else takes the row over only once it has expired, and each takeover raises the epoch by one. The
leader hands its epoch to :meth:`GroupCommitLog.fence`, so every write transaction checks it: a leader
that was paused past its lease (GC, SIGSTOP, a partition) and deposed cannot write when it wakes up.

Expiry is judged on the store's clock (one clock for every replica). The holder also keeps a local,
conservative deadline (:attr:`Lease.valid_until`, measured from *before* its last successful claim) and
stops acting as leader when it passes without a renewal, before any other replica can take over.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from guardmesh.durable import GroupCommitLog, Transaction

#: How a standby's UNAVAILABLE message names the leader; the client factory follows it (guardmesh/client.py).
_LEADER_IN_MESSAGE = re.compile(r"\bleader=([^\s;,()]+)")


def standby_message(service: str, leader_address: str) -> str:
    """The UNAVAILABLE message of a standby replica: it names the leader so clients can follow it."""
    if leader_address:
        return f"{service} replica is a standby; not the leader: leader={leader_address}"
    return f"{service} replica is a standby and no leader is known yet (one takes over within a lease)"


def leader_in_message(message: str) -> str:
    """The leader address named in a standby's message ("" if none)."""
    found = _LEADER_IN_MESSAGE.search(message)
    return found.group(1) if found else ""


@dataclass(frozen=True)
class LeaseState:
    """The lease as one claim saw it."""

    #: Whether this replica holds the lease now.
    leader: bool
    #: The fencing token of the current holder (0 before anyone held it).
    epoch: int
    #: The holder's id and the address it serves on ("" when nobody holds it).
    holder: str
    address: str


class Lease:
    """Claims and renews the lease row ``name`` for ``holder`` at ``address``.

    ``holder`` must never be live twice at once; it may stay the same across restarts of one replica (its
    host and port: a restarted replica takes its own row over at once, with a new epoch, instead of
    waiting for the dead life's lease to lapse).
    """

    def __init__(self, log: GroupCommitLog, name: str, holder: str, address: str, ttl_s: float) -> None:
        self.log = log
        self.name = name
        self.holder = holder
        self.address = address
        self.ttl_s = ttl_s
        self.epoch = 0
        #: ``time.monotonic()`` until which this replica may act as leader (0: not leader).
        self.valid_until = 0.0

    def claim(self) -> LeaseState:
        """Renew the lease if held, take it over if expired or never held; StoreFailure if the store
        cannot be reached (the local deadline then runs out on its own)."""
        began = time.monotonic()
        state = self.log.transaction(self._claim)
        if state.leader:
            self.epoch = state.epoch
            self.valid_until = began + self.ttl_s
        else:
            self.valid_until = 0.0
        return state

    def _claim(self, tx: Transaction) -> LeaseState:
        now = float(tx.fetchall(self.log.backend.now_sql)[0][0])
        expires = now + self.ttl_s
        tx.execute(
            "INSERT INTO leases (name, holder, address, epoch, expires_at) VALUES (?, '', '', 0, 0) "
            "ON CONFLICT (name) DO NOTHING",
            (self.name,),
        )
        renewed = self.epoch and tx.execute(
            "UPDATE leases SET expires_at = ?, address = ? WHERE name = ? AND holder = ? AND epoch = ?",
            (expires, self.address, self.name, self.holder, self.epoch),
        )
        if not renewed:
            tx.execute(
                "UPDATE leases SET holder = ?, address = ?, epoch = epoch + 1, expires_at = ? "
                "WHERE name = ? AND (expires_at < ? OR holder = '' OR holder = ?)",
                (self.holder, self.address, expires, self.name, now, self.holder),
            )
        holder, address, epoch = tx.fetchall("SELECT holder, address, epoch FROM leases WHERE name = ?", (self.name,))[
            0
        ]
        return LeaseState(holder == self.holder, int(epoch), str(holder), str(address))

    def forget(self) -> None:
        """Stop acting as leader locally; the next :meth:`claim` takes a new epoch even if the row is still
        this holder's, so nothing written under the old epoch can land afterwards."""
        self.epoch = 0
        self.valid_until = 0.0

    def valid(self) -> bool:
        """Whether this replica may still act as leader by its own conservative clock."""
        return time.monotonic() < self.valid_until

    def release(self) -> None:
        """Give the lease up at once (a graceful stop), so a standby need not wait for it to expire."""
        if not self.epoch:
            return
        self.valid_until = 0.0
        self.log.transaction(
            lambda tx: tx.execute(
                "UPDATE leases SET holder = '', expires_at = 0 WHERE name = ? AND holder = ? AND epoch = ?",
                (self.name, self.holder, self.epoch),
            )
        )

    def current(self) -> LeaseState:
        """The lease row as it is now (for status displays), without claiming."""
        rows = self.log.query("SELECT holder, address, epoch FROM leases WHERE name = ?", (self.name,))
        if not rows:
            return LeaseState(False, 0, "", "")
        holder, address, epoch = rows[0]
        return LeaseState(holder == self.holder and self.valid(), int(epoch), str(holder), str(address))
