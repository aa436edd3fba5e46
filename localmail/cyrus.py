"""A throwaway Cyrus IMAP 3.6 (IMAP + LMTP + idled) on free loopback ports, for the tests.

Cyrus runs from Debian's packages unpacked into a folder (``localmail.cyrus_packages``): installed,
``cyrus-imapd`` would remove Dovecot. Everything the instance owns lives in one work folder: its
``imapd.conf`` and ``cyrus.conf``, ``configdirectory`` (databases, ``socket/``, ``proc/``), the
mail partition and the SASL password database. ``master`` runs in the foreground as a child of
this process; started as root it switches to the ``mail`` user (``cyrus_user``), since Cyrus's
services refuse to run as root, so the work folder belongs to that user.

As an operator's Cyrus must, it runs ``idled`` and has the ``socket`` folder under
``configdirectory``: without them IDLE falls back to checking the mailbox every 60 s.
"""

from __future__ import annotations

import os
import pwd
import secrets
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from localmail.cyrus_packages import CyrusInstallation, CyrusNotUnpacked, find_installation
from localmail.dovecot import LOOPBACK, free_loopback_ports, new_work_dir
from localmail.imap_server import LocalImapServer, LocalServerError, start_in_own_session

CYRUS_USER = "mail"
WORK_DIR_PREFIX = "emailops-cyrus-"
ADMIN_USER = "cyrus-admin"
MULTIAPPEND_BATCH = 200


class CyrusError(LocalServerError):
    """The local Cyrus could not be started, stopped or driven."""


class LocalCyrus(LocalImapServer):
    """One private Cyrus instance: plain IMAP and LMTP on loopback, ``idled`` for IDLE.

    ``users`` maps login names (``alice@example.test`` or a bare ``alice``) to passwords; each gets
    an INBOX (``user/<name>``, created by an admin on the first start). Folders are named as the
    user sees them (``altnamespace``, ``/`` as separator), as with ``LocalDovecot``. Ports are chosen
    at construction and kept across ``restart()``. ``work_dir`` (made if missing) holds
    everything; without it a temporary folder is made and removed again by ``close()``.
    """

    kind = "cyrus"
    error_class = CyrusError

    def __init__(
        self,
        users: Mapping[str, str],
        *,
        work_dir: Path | None = None,
        installation: CyrusInstallation | None = None,
    ) -> None:
        try:
            self._installation = installation or find_installation()
        except CyrusNotUnpacked as error:
            raise CyrusError(str(error)) from None
        try:
            account = pwd.getpwnam(CYRUS_USER)
        except KeyError:
            raise CyrusError(f"no {CYRUS_USER!r} system user to run Cyrus as") from None
        self._uid, self._gid = account.pw_uid, account.pw_gid
        self._users = {}
        for user, password in users.items():
            if not user or not password or any(c in user + password for c in "\r\n\0") or user == ADMIN_USER:
                raise ValueError(f"unusable account {user!r}")
            self._users[user] = password
        self._admin_password = secrets.token_urlsafe(16)

        self._owns_work_dir = work_dir is None
        if work_dir is None:
            work_dir = new_work_dir(WORK_DIR_PREFIX)
        self.work_dir = work_dir.resolve()
        self.host = LOOPBACK
        self.imap_port, self.lmtp_port = free_loopback_ports(2, self.host)
        self.config_file = self.work_dir / "imapd.conf"
        self.services_file = self.work_dir / "cyrus.conf"
        self.config_dir = self.work_dir / "config"
        self.sasldb = self.work_dir / "sasldb2"
        self._stderr_file = self.work_dir / "master-stderr.log"
        self._accounts_created = False
        self._prepare_files()

    # ----------------------------------------------------------------------------- files

    def _prepare_files(self) -> None:
        for folder in ("config/socket", "config/proc", "config/db", "partition", "run"):
            (self.work_dir / folder).mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(self._render_imapd_conf())
        self.services_file.write_text(self._render_cyrus_conf())
        for login, password in [*self._users.items(), (ADMIN_USER, self._admin_password)]:
            subprocess.run(
                [str(self._installation.saslpasswd2), "-p", "-c", "-f", str(self.sasldb), login],
                input=password.encode(),
                env=self._installation.environment(),
                check=True,
                capture_output=True,
            )
        for path in (self.work_dir, *self.work_dir.rglob("*")):
            os.chown(path, self._uid, self._gid)

    def _render_imapd_conf(self) -> str:
        lines = [
            "# Written by localmail.cyrus.LocalCyrus for one test run.",
            f"configdirectory: {self.config_dir}",
            "defaultpartition: default",
            f"partition-default: {self.work_dir / 'partition'}",
            f"cyrus_user: {CYRUS_USER}",
            f"admins: {ADMIN_USER}",
            # user@domain logins are users of that domain, as the tests' accounts are.
            "virtdomains: userid",
            # Folders at the top level with "/" between levels, as users of Dovecot see them.
            "altnamespace: yes",
            "unixhierarchysep: yes",
            "allowplaintext: yes",
            "sasl_mech_list: PLAIN LOGIN",
            "sasl_pwcheck_method: auxprop",
            "sasl_auxprop_plugin: sasldb",
            f"sasl_sasldb_path: {self.sasldb}",
        ]
        return "\n".join(lines) + "\n"

    def _render_cyrus_conf(self) -> str:
        bin_dir = self._installation.bin_dir
        config = f"-C {self.config_file}"
        imap, lmtp = f"{self.host}:{self.imap_port}", f"{self.host}:{self.lmtp_port}"
        return (
            "\n".join(
                [
                    "START {",
                    f'  recover cmd="{bin_dir}/ctl_cyrusdb {config} -r"',
                    "}",
                    "SERVICES {",
                    f'  imap cmd="{bin_dir}/imapd {config}" listen="{imap}" prefork=0',
                    # -a: LMTP over TCP without AUTH, as an MTA on the same machine delivers.
                    f'  lmtp cmd="{bin_dir}/lmtpd -a {config}" listen="{lmtp}" prefork=0',
                    "}",
                    "DAEMON {",
                    # Tells each IDLE session of changes at once; without it Cyrus checks every 60 s.
                    f'  idled cmd="{bin_dir}/idled {config}"',
                    "}",
                ]
            )
            + "\n"
        )

    # ----------------------------------------------------------------------------- lifecycle

    def _launch(self) -> subprocess.Popen[bytes]:
        # -D: stay in the foreground; -p: the pid file orphan clean-up looks for.
        master = [str(self._installation.bin_dir / "master"), "-D", "-C", str(self.config_file)]
        master += ["-M", str(self.services_file), "-p", str(self.work_dir / "run" / "master.pid")]
        return start_in_own_session(master, self._stderr_file, self._installation.environment())

    def _finish_start(self, deadline: float, alive: Callable[[], bool]) -> None:
        """Wait for idled too (IDLE without it is Cyrus's 60 s check); make the accounts once."""
        idle_socket = self.config_dir / "socket" / "idle"
        while not idle_socket.exists():
            if time.monotonic() > deadline or not alive():
                raise CyrusError("idled did not start")
            time.sleep(0.02)
        if not self._accounts_created:
            self._create_accounts()

    def _create_accounts(self) -> None:
        """Each user's INBOX is a mailbox the admin creates (Cyrus makes none on login by default)."""
        with self.signed_in(ADMIN_USER, self._admin_password) as admin:
            for user in self._users:
                admin.create_folder(f"user/{user}")
        self._accounts_created = True

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_text(self) -> str:
        """The master's output (Cyrus logs to syslog, which the tests do not run)."""
        return self._stderr_file.read_text(errors="replace") if self._stderr_file.exists() else ""

    # ----------------------------------------------------------------------------- mail

    def bulk_load(
        self,
        user: str,
        folder: str,
        messages: Iterable[bytes],
        flags: Iterable[str] = (),
    ) -> int:
        """APPEND the messages in batches (MULTIAPPEND: one command, one UID range per batch).

        Cyrus keeps its own index of every message, so there is no faster way in than IMAP.
        """
        flag_list = tuple(flags)
        count = 0
        with self.imap(user) as client:
            if not client.folder_exists(folder):
                client.create_folder(folder)
            batch: list[dict[str, object]] = []
            for raw in messages:
                batch.append({"msg": raw, "flags": flag_list})
                if len(batch) == MULTIAPPEND_BATCH:
                    client.multiappend(folder, batch)
                    count, batch = count + len(batch), []
            if batch:
                client.multiappend(folder, batch)
                count += len(batch)
        return count

    # ----------------------------------------------------------------------------- processes

    def imap_process_ids(self, user: str | None = None) -> list[int]:
        """Pids of this instance's IMAP sessions (all, or those logged in as ``user``).

        Cyrus registers each session in ``configdirectory/proc/<pid>``: service, client, user,
        mailbox, command, tab-separated.
        """
        if self._process is None:
            return []
        pids = []
        for entry in (self.config_dir / "proc").iterdir():
            try:
                fields = entry.read_text().split("\t")
                state, parent = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[:2]
            except (OSError, ValueError):
                continue  # the session ended meanwhile
            # A killed session stays registered until the master reaps it (a zombie until then).
            if fields[0] != "imap" or state == "Z" or int(parent) != self._process.pid:
                continue
            if user is not None and (len(fields) < 3 or fields[2] != user):
                continue
            pids.append(int(entry.name))
        return pids
