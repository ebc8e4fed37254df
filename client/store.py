"""Device state on disk: a kiosk's users, their interactions and their user-local rows.

A SuperNode keeps its users' embeddings in ``Context.state``, which lives only as long as
the SuperNode process. A kiosk or phone must keep them across restarts, and its operator
must be able to add users and erase one (right to erasure) while it is deployed. This
module is that store: one :class:`DeviceState` per device, saved as a single ``.npz``
file in a state directory (written atomically: temp file, fsync, ``os.replace``), and a
small API for the operator::

    from client import store
    store.create("/var/lib/fedrec", num_items=3706)           # an empty kiosk
    store.add_user("/var/lib/fedrec", 5001, items=[3, 17, 42])
    store.add_interactions("/var/lib/fedrec", 5001, items=[8])
    store.forget_user("/var/lib/fedrec", 5001)                 # rows + interactions gone

Users are global ids (the ClientApp derives seeds from them); a user's local index is its
position in ``DeviceState.users``. Forgetting a user removes every row, interaction and
held-out item of that user, so the next round is computed exactly as on a device that
never held them (same remaining users, rows and seeds; see ``tests/test_device_store.py``).
It does not unlearn the user's past influence on the global model or on the other users'
rows, which were trained with theirs.

Beside it, ``global-model.npz`` holds the last global shared model the device received
(with the run-config it belongs to), so the device can recommend between rounds and after
a restart without asking the server (:func:`client.recommend.recommend_on_device`).

Every disk operation takes an exclusive ``flock`` on ``<dir>/.lock``: the ClientApp holds
it from loading the state to saving the trained rows, so an erasure during a round waits
for the round to end instead of being overwritten by it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from common.errors import DataError, plain_message
from common.federation import ClientData, EvalData
from common.models import ModelConfig, build_model

__all__ = [
    "DeviceState",
    "GLOBAL_MODEL_FILE",
    "GlobalModel",
    "STATE_FILE",
    "add_interactions",
    "add_user",
    "create",
    "forget_user",
    "fresh_user_rows",
    "fresh_user_seed",
    "global_model_file",
    "load",
    "load_global_model",
    "locked",
    "save",
    "save_global_model",
    "state_file",
]

STATE_FILE = "device-state.npz"
GLOBAL_MODEL_FILE = "global-model.npz"
GLOBAL_FORMAT = "fedrec-global-model/1"
_SHARED = "shared:"  # prefix of the shared arrays inside global-model.npz, in the model's order
LOCK_FILE = ".lock"
FORMAT = "fedrec-device-state/1"
_ROWS = "rows:"  # prefix of user-local arrays inside the .npz
History = list[tuple[float, float, int]]  # as client.private_training.History (not imported: no Opacus here)


def fresh_user_seed(seed: int, user: int) -> int:
    """Seed of one user's fresh embedding: a function of the run seed and that user only.

    The same formula as :func:`client.local.user_seed` for a client whose first user is
    ``user``, so a one-user device starts from the same rows with or without a store.
    """
    return (seed * 1_000_003 + int(user)) % (2**31)


def fresh_user_rows(model_config: ModelConfig, num_items: int, seed: int, user: int) -> dict[str, np.ndarray]:
    """One new user's user-local rows (one row per ``user_*`` array), as the model initialises them.

    Built from a one-user model seeded by :func:`fresh_user_seed`, so it does not depend on
    which other users share the device or in which order they arrived.
    """
    model = build_model(model_config, 1, num_items, seed=fresh_user_seed(seed, user))
    return dict(model.local_state())


def _empty_eval(num_negatives: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.empty(0, np.int64), np.empty(0, np.int64), np.empty((0, num_negatives), np.int64)


@dataclass(frozen=True)
class DeviceState:
    """Everything a device keeps about its users; all user ids are global ids.

    ``rows`` holds the user-local arrays (``user_*`` parameters), row ``i`` belonging to
    ``row_users[i]``; a user added since the last round has no row yet and gets a fresh
    one (:func:`fresh_user_rows`) when the device next trains or evaluates.
    """

    num_items: int
    users: np.ndarray  # int64, local order
    train_users: np.ndarray  # int64 global id per interaction
    train_items: np.ndarray  # int64
    train_ratings: np.ndarray  # float32 (ignored by the implicit losses bce and bpr)
    test: tuple[np.ndarray, np.ndarray, np.ndarray]  # (global users, held-out items, negatives)
    validation: tuple[np.ndarray, np.ndarray, np.ndarray]
    row_users: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    record_history: History = field(default_factory=list)  # record-level DP spent by this device
    partition_id: int = -1  # the data partition it was initialised from (-1: created empty)

    # --- construction ---------------------------------------------------------
    @classmethod
    def empty(cls, num_items: int) -> DeviceState:
        """A device with no users yet (a new kiosk)."""
        if int(num_items) < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        return cls(
            num_items=int(num_items),
            users=np.empty(0, np.int64),
            train_users=np.empty(0, np.int64),
            train_items=np.empty(0, np.int64),
            train_ratings=np.empty(0, np.float32),
            test=_empty_eval(),
            validation=_empty_eval(),
        )

    @classmethod
    def from_client_data(cls, data: ClientData, partition_id: int = -1) -> DeviceState:
        """The first state of a SuperNode: its data partition, no user rows yet."""
        users = np.asarray(data.global_users, np.int64)

        def global_eval(part: EvalData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            return users[part.users].astype(np.int64), part.items.astype(np.int64), part.negatives.astype(np.int64)

        return cls(
            num_items=int(data.num_items),
            users=users.copy(),
            train_users=users[data.train_users].astype(np.int64),
            train_items=data.train_items.astype(np.int64),
            train_ratings=data.train_ratings.astype(np.float32),
            test=global_eval(data.test),
            validation=global_eval(data.validation),
            partition_id=int(partition_id),
        )

    # --- what the training code needs ---------------------------------------
    def client_data(self, item_features: np.ndarray | None = None) -> ClientData:
        """This state as the :class:`ClientData` that :mod:`client.local` trains on.

        Interactions are grouped by local user (stable, so in the order they were added),
        which for a state made by :meth:`from_client_data` is exactly the partition's order.
        ``item_features``: the public catalogue a hybrid model reads (not kept in the state).
        """
        local_of = {int(u): i for i, u in enumerate(self.users)}
        train_local = np.array([local_of[int(u)] for u in self.train_users], np.int64)
        order = np.argsort(train_local, kind="stable")

        def local_eval(part: tuple[np.ndarray, np.ndarray, np.ndarray]) -> EvalData:
            users, items, negatives = part
            return EvalData(np.array([local_of[int(u)] for u in users], np.int64), items, negatives)

        return ClientData(
            global_users=self.users.copy(),
            train_users=train_local[order],
            train_items=self.train_items[order],
            train_ratings=self.train_ratings[order],
            test=local_eval(self.test),
            validation=local_eval(self.validation),
            num_items=self.num_items,
            item_features=item_features,
        )

    def local_state(self, model_config: ModelConfig, seed: int) -> dict[str, np.ndarray]:
        """User-local arrays aligned with ``users``: kept rows, fresh rows for new users."""
        position = {int(u): i for i, u in enumerate(self.row_users)}
        per_user: list[dict[str, np.ndarray]] = []
        for user in self.users:
            i = position.get(int(user))
            if i is None:
                per_user.append({k: v[0] for k, v in fresh_user_rows(model_config, self.num_items, seed, int(user)).items()})
            else:
                per_user.append({name: array[i] for name, array in self.rows.items()})
        if not per_user:
            # No users: the tables are empty but must still have the model's shapes.
            template = fresh_user_rows(model_config, self.num_items, seed, 0)
            return {name: np.empty((0, *array.shape[1:]), array.dtype) for name, array in template.items()}
        names = list(per_user[0])
        return {name: np.stack([rows[name] for rows in per_user]).astype(np.float32) for name in names}

    def users_without_rows(self) -> np.ndarray:
        """Mask over ``users``: who has no trained rows yet (added since the device last trained)."""
        return ~np.isin(self.users, self.row_users)

    def with_local_state(self, local_state: dict[str, np.ndarray], record_history: History | None = None) -> DeviceState:
        """After a round: the trained rows of every user (aligned with ``users``)."""
        for name, array in local_state.items():
            if len(array) != len(self.users):
                raise ValueError(f"{name} has {len(array)} rows for {len(self.users)} users")
        return replace(
            self,
            row_users=self.users.copy(),
            rows={name: np.array(array, np.float32) for name, array in local_state.items()},
            record_history=self.record_history if record_history is None else list(record_history),
        )

    def with_user_rows(self, user: int, rows: dict[str, np.ndarray]) -> DeviceState:
        """One user's rows replaced (learning between rounds); every other row stays as it was."""
        position = np.flatnonzero(self.row_users == int(user))
        if len(position) == 0:
            raise KeyError(f"user {user} has no rows on this device yet")
        if set(rows) != set(self.rows):
            raise ValueError(f"rows must name exactly {sorted(self.rows)}, got {sorted(rows)}")
        updated = {name: array.copy() for name, array in self.rows.items()}
        for name, row in rows.items():
            updated[name][position[0]] = np.asarray(row, np.float32)
        return replace(self, rows=updated)

    # --- the operator's edits (pure: return a new state) ---------------------
    def _interactions(
        self, user: int, items: Sequence[int] | np.ndarray, ratings: Sequence[float] | np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        items = np.asarray(items)
        if items.ndim != 1 or (items.size and not np.issubdtype(items.dtype, np.integer)):
            raise ValueError(f"items must be a 1-D list of integer item ids, got {items.dtype} with shape {items.shape}")
        items = items.astype(np.int64)
        bad = items[(items < 0) | (items >= self.num_items)]
        if bad.size:
            raise ValueError(f"item {int(bad[0])} is out of range: this device's catalogue has items 0..{self.num_items - 1}")
        if ratings is None:
            values = np.ones(len(items), np.float32)
        else:
            values = np.asarray(ratings, np.float32)
            if values.shape != items.shape:
                raise ValueError(f"{len(values)} ratings for {len(items)} items")
            if not np.isfinite(values).all():
                raise ValueError("ratings must be finite numbers")
        return np.full(len(items), user, np.int64), items, values

    def has_user(self, user: int) -> bool:
        return bool(np.any(self.users == int(user)))

    def with_user(
        self, user: int, items: Sequence[int] | np.ndarray = (), ratings: Sequence[float] | np.ndarray | None = None
    ) -> DeviceState:
        """A new user (global id) with their interactions; their rows start fresh."""
        user = _user_id(user)
        if self.has_user(user):
            raise ValueError(f"user {user} is already on this device")
        new_users, new_items, new_ratings = self._interactions(user, items, ratings)
        return replace(
            self,
            users=np.append(self.users, np.int64(user)),
            train_users=np.concatenate([self.train_users, new_users]),
            train_items=np.concatenate([self.train_items, new_items]),
            train_ratings=np.concatenate([self.train_ratings, new_ratings]),
        )

    def with_interactions(
        self, user: int, items: Sequence[int] | np.ndarray, ratings: Sequence[float] | np.ndarray | None = None
    ) -> DeviceState:
        """More interactions of a user already on the device (used from the next round on)."""
        user = _user_id(user)
        if not self.has_user(user):
            raise KeyError(f"user {user} is not on this device ({len(self.users)} users); add it first")
        new_users, new_items, new_ratings = self._interactions(user, items, ratings)
        return replace(
            self,
            train_users=np.concatenate([self.train_users, new_users]),
            train_items=np.concatenate([self.train_items, new_items]),
            train_ratings=np.concatenate([self.train_ratings, new_ratings]),
        )

    def without_user(self, user: int) -> DeviceState:
        """Right to erasure: the state as if ``user`` had never been on the device."""
        user = _user_id(user)
        if not self.has_user(user):
            raise KeyError(f"user {user} is not on this device ({len(self.users)} users)")
        keep_train = self.train_users != user
        keep_rows = self.row_users != user

        def drop(part: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            keep = part[0] != user
            return part[0][keep], part[1][keep], part[2][keep]

        return replace(
            self,
            users=self.users[self.users != user],
            train_users=self.train_users[keep_train],
            train_items=self.train_items[keep_train],
            train_ratings=self.train_ratings[keep_train],
            test=drop(self.test),
            validation=drop(self.validation),
            row_users=self.row_users[keep_rows],
            rows={name: array[keep_rows] for name, array in self.rows.items()},
        )

    # --- on disk ---------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        """The ``.npz`` members (no pickled objects)."""
        arrays = {
            "format": np.array(FORMAT),
            "num_items": np.array(self.num_items, np.int64),
            "partition_id": np.array(self.partition_id, np.int64),
            "users": self.users,
            "train_users": self.train_users,
            "train_items": self.train_items,
            "train_ratings": self.train_ratings,
            "row_users": self.row_users,
            "dp_noise": np.array([z for z, _, _ in self.record_history], np.float64),
            "dp_rate": np.array([q for _, q, _ in self.record_history], np.float64),
            "dp_steps": np.array([n for _, _, n in self.record_history], np.int64),
        }
        for prefix, (users, items, negatives) in (("test", self.test), ("val", self.validation)):
            arrays.update({f"{prefix}_users": users, f"{prefix}_items": items, f"{prefix}_negatives": negatives})
        arrays.update({_ROWS + name: array for name, array in self.rows.items()})
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> DeviceState:
        """Inverse of :meth:`to_arrays`; raises ``ValueError`` naming what is inconsistent."""
        fmt = str(arrays["format"])
        if fmt != FORMAT:
            raise ValueError(f"format is {fmt!r}, expected {FORMAT!r}")

        def ints(name: str, ndim: int = 1) -> np.ndarray:
            value = arrays[name]
            if value.ndim != ndim or (value.size and not np.issubdtype(value.dtype, np.integer)):
                raise ValueError(f"{name} must be a {ndim}-D integer array, got {value.dtype} {value.shape}")
            return value.astype(np.int64)

        num_items = int(ints("num_items", 0))
        users = ints("users")
        if len(np.unique(users)) != len(users):
            raise ValueError("users has duplicates")
        known = set(users.tolist())

        def check_users(name: str, values: np.ndarray) -> None:
            unknown = set(values.tolist()) - known
            if unknown:
                raise ValueError(f"{name} names user {min(unknown)}, who is not in users")

        def check_items(name: str, values: np.ndarray) -> None:
            if values.size and (values.min() < 0 or values.max() >= num_items):
                raise ValueError(f"{name} has an item outside 0..{num_items - 1}")

        train_users, train_items = ints("train_users"), ints("train_items")
        train_ratings = np.asarray(arrays["train_ratings"], np.float32)
        if not len(train_users) == len(train_items) == len(train_ratings):
            raise ValueError("train_users, train_items and train_ratings differ in length")
        check_users("train_users", train_users)
        check_items("train_items", train_items)
        evals = []
        for prefix in ("test", "val"):
            part = ints(f"{prefix}_users"), ints(f"{prefix}_items"), ints(f"{prefix}_negatives", 2)
            if not len(part[0]) == len(part[1]) == len(part[2]):
                raise ValueError(f"{prefix}_users, {prefix}_items and {prefix}_negatives differ in length")
            check_users(f"{prefix}_users", part[0])
            check_items(f"{prefix}_items", part[1])
            check_items(f"{prefix}_negatives", part[2])
            evals.append(part)
        row_users = ints("row_users")
        check_users("row_users", row_users)
        if len(np.unique(row_users)) != len(row_users):
            raise ValueError("row_users has duplicates")
        rows = {}
        for key, value in arrays.items():
            if key.startswith(_ROWS):
                if value.dtype != np.float32 or value.ndim < 1 or len(value) != len(row_users):
                    raise ValueError(f"{key} must be float32 with {len(row_users)} rows, got {value.dtype} {value.shape}")
                if not np.isfinite(value).all():
                    raise ValueError(f"{key} holds non-finite values")
                rows[key[len(_ROWS):]] = value
        if len(row_users) and not rows:
            raise ValueError("row_users is set but there are no user-local arrays")
        noise, rate, steps = (np.asarray(arrays[k]) for k in ("dp_noise", "dp_rate", "dp_steps"))
        if not len(noise) == len(rate) == len(steps):
            raise ValueError("dp_noise, dp_rate and dp_steps differ in length")
        return cls(
            num_items=num_items,
            users=users,
            train_users=train_users,
            train_items=train_items,
            train_ratings=train_ratings,
            test=evals[0],
            validation=evals[1],
            row_users=row_users,
            rows=rows,
            record_history=[(float(z), float(q), int(n)) for z, q, n in zip(noise, rate, steps, strict=True)],
            partition_id=int(ints("partition_id", 0)),
        )


def _user_id(user: int) -> int:
    if isinstance(user, bool) or not isinstance(user, (int, np.integer)) or int(user) < 0:
        raise ValueError(f"a user id must be a non-negative integer, got {user!r}")
    return int(user)


def state_file(state_dir: str | os.PathLike[str]) -> Path:
    """The state file inside a state directory."""
    return Path(state_dir) / STATE_FILE


@contextlib.contextmanager
def locked(state_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Exclusive lock on the device state (blocks while another process holds it).

    Held by the ClientApp for a whole round (load, train, save) and by each operator edit,
    so neither overwrites the other's change.
    """
    directory = Path(state_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(directory / LOCK_FILE, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def exists(state_dir: str | os.PathLike[str]) -> bool:
    return state_file(state_dir).is_file()


def load(state_dir: str | os.PathLike[str]) -> DeviceState:
    """The saved state; a missing, truncated or inconsistent file is a one-line :class:`DataError`."""
    path = state_file(state_dir)
    if not path.is_file():
        raise DataError("no device state here; create it with client.store.create or start the SuperNode once", path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}  # reads every member: zip CRCs are checked
        return DeviceState.from_arrays(arrays)
    except DataError:
        raise
    except KeyError as err:
        raise DataError(f"corrupted device state: member {err} is missing; restore a backup or remove the file", path) from None
    except Exception as err:  # noqa: BLE001 - zip, npy-header and consistency errors all mean the same to the operator
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise DataError(f"corrupted device state ({reason}); restore a backup or remove the file", path) from None


def _remove_stale_temp_files(directory: Path, name: str) -> None:
    """Temp files left by a crashed write may hold data of a user forgotten since; drop them."""
    for stale in directory.glob(f".{name}.*.tmp"):
        stale.unlink(missing_ok=True)


def _write_atomically(directory: Path, name: str, arrays: dict[str, np.ndarray]) -> Path:
    """``np.savez`` to ``directory/name`` via temp file, fsync and rename: all or nothing."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    _remove_stale_temp_files(directory, name)
    path = directory / name
    handle, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(handle, "wb") as out:
            np.savez(out, **arrays)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return path


def save(state_dir: str | os.PathLike[str], state: DeviceState) -> Path:
    """Write the state atomically: a crash at any point leaves the previous file intact.

    Call with :func:`locked` held when the state was read from the same directory.
    """
    return _write_atomically(Path(state_dir), STATE_FILE, state.to_arrays())


@dataclass(frozen=True)
class GlobalModel:
    """The latest global shared model this device received, and the run-config it ran with.

    Kept so the device can recommend between rounds (and after a restart) without the
    server; the run-config tells which model the arrays belong to.
    """

    run_config: dict[str, object]
    shared: list[np.ndarray]
    server_round: int
    popular_items: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # the server's fallback list


def global_model_file(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / GLOBAL_MODEL_FILE


def save_global_model(state_dir: str | os.PathLike[str], model: GlobalModel) -> Path:
    """Write the received global model atomically beside the device state."""
    arrays = {f"{_SHARED}{i:03d}": np.asarray(a) for i, a in enumerate(model.shared)}
    arrays["format"] = np.array(GLOBAL_FORMAT)
    arrays["run_config"] = np.array(json.dumps(dict(model.run_config), sort_keys=True))
    arrays["server_round"] = np.array(int(model.server_round), np.int64)
    arrays["popular_items"] = np.asarray(model.popular_items, np.int64)
    return _write_atomically(Path(state_dir), GLOBAL_MODEL_FILE, arrays)


def load_global_model(state_dir: str | os.PathLike[str]) -> GlobalModel:
    """The saved global model; missing or unreadable is a one-line :class:`DataError`."""
    path = global_model_file(state_dir)
    if not path.is_file():
        raise DataError("no global model on this device yet: it is saved when the device first takes part in a round", path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            if str(npz["format"]) != GLOBAL_FORMAT:
                raise DataError(f"not a {GLOBAL_FORMAT} file (format {str(npz['format'])!r})", path)
            shared = [npz[name] for name in sorted(n for n in npz.files if n.startswith(_SHARED))]
            return GlobalModel(json.loads(str(npz["run_config"])), shared, int(npz["server_round"]),
                               npz["popular_items"].astype(np.int64))
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - zip, npy-header and JSON errors all mean the same to the operator
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise DataError(f"corrupted global model ({reason}); it is rewritten at the next round", path) from None


def _edit(state_dir: str | os.PathLike[str], change) -> DeviceState:
    with locked(state_dir):
        state = load(state_dir)
        try:
            new = change(state)
        except (KeyError, ValueError) as err:
            raise DataError(plain_message(err), state_file(state_dir)) from None
        save(state_dir, new)
        return new


def create(state_dir: str | os.PathLike[str], num_items: int) -> DeviceState:
    """An empty device state for a catalogue of ``num_items`` items (refuses to overwrite one)."""
    with locked(state_dir):
        if exists(state_dir):
            raise DataError("a device state already exists; forget its users or remove the file first", state_file(state_dir))
        state = DeviceState.empty(num_items)
        save(state_dir, state)
        return state


def add_user(
    state_dir: str | os.PathLike[str],
    user: int,
    items: Sequence[int] | np.ndarray = (),
    ratings: Sequence[float] | np.ndarray | None = None,
) -> DeviceState:
    """Add a user (global id) and their interactions; they take part from the next round."""
    return _edit(state_dir, lambda state: state.with_user(user, items, ratings))


def add_interactions(
    state_dir: str | os.PathLike[str],
    user: int,
    items: Sequence[int] | np.ndarray,
    ratings: Sequence[float] | np.ndarray | None = None,
) -> DeviceState:
    """Record more interactions of a user on the device."""
    return _edit(state_dir, lambda state: state.with_interactions(user, items, ratings))


def forget_user(state_dir: str | os.PathLike[str], user: int) -> DeviceState:
    """Erase a user: their rows, interactions and held-out items leave the saved state.

    Waits for a round in progress to finish (the lock), so the round cannot write the user
    back. The old file is replaced, not overwritten in place; wiping freed disk blocks is
    the file system's business (use an encrypted disk).
    """
    return _edit(state_dir, lambda state: state.without_user(user))
