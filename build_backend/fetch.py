"""Fetch one file from a Python package index with the standard library, as pip would find it.

The build backend runs inside whatever environment the build frontend made (pip's isolated
build environment has no pip, uv's neither), so the pinned llama.cpp sdist is fetched here,
not with ``pip download``. The user's pip configuration still applies: index-url,
extra-index-url, find-links, no-index, cert, client-cert, trusted-host, proxy and timeout,
read from pip's configuration files and ``PIP_*`` variables in pip's order of precedence
(``UV_INDEX_URL``/``UV_DEFAULT_INDEX`` and ``UV_EXTRA_INDEX_URL`` are honoured too).
Every failure is one line naming its cause: no route to the index, an HTTP status, a TLS
error, a file that no index lists.
"""

from __future__ import annotations

import base64
import configparser
import html.parser
import json
import os
import re
import shutil
import socket
import ssl
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

PYPI = "https://pypi.org/simple"
JSON_ACCEPT = "application/vnd.pypi.simple.v1+json, text/html;q=0.1"


class FetchError(RuntimeError):
    """The file could not be fetched; the message names the real cause in one line."""


@dataclass
class IndexConfig:
    """Where to look and how to connect, as pip would for the same environment."""

    index_url: str = PYPI
    extra_index_urls: list[str] = field(default_factory=list)
    find_links: list[str] = field(default_factory=list)
    no_index: bool = False
    cert: str | None = None
    client_cert: str | None = None
    trusted_hosts: list[str] = field(default_factory=list)
    proxy: str | None = None
    timeout: float = 15.0

    @property
    def indexes(self) -> list[str]:
        return [] if self.no_index else [self.index_url, *self.extra_index_urls]


def _config_files() -> list[Path]:
    """pip's configuration files, lowest precedence first (global, user, site, PIP_CONFIG_FILE)."""
    xdg_dirs = os.environ.get("XDG_CONFIG_DIRS", "/etc/xdg").split(os.pathsep)
    files = [Path(d) / "pip" / "pip.conf" for d in reversed(xdg_dirs) if d] + [Path("/etc/pip.conf")]
    home = Path.home()
    xdg_home = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    files += [home / ".pip" / "pip.conf", xdg_home / "pip" / "pip.conf"]
    if sys.platform == "win32":
        files += [Path(os.environ.get("APPDATA", home)) / "pip" / "pip.ini"]
    venv = os.environ.get("VIRTUAL_ENV")
    if venv:
        files.append(Path(venv) / ("pip.ini" if sys.platform == "win32" else "pip.conf"))
    explicit = os.environ.get("PIP_CONFIG_FILE")
    if explicit == os.devnull:
        return []
    if explicit:
        files.append(Path(explicit))
    return files


def _read_settings() -> dict[str, str]:
    """pip's settings merged over files then ``PIP_*`` variables ([global], then [install]/[download])."""
    values: dict[str, str] = {}
    for path in _config_files():
        parser = configparser.RawConfigParser()
        try:
            parser.read(path, encoding="utf-8")
        except (OSError, configparser.Error):
            continue
        for section in ("global", "install", "download"):
            if parser.has_section(section):
                values.update({k.replace("_", "-"): v for k, v in parser.items(section)})
    for key, value in os.environ.items():
        if key.startswith("PIP_") and value:
            values[key[4:].lower().replace("_", "-")] = value
    return values


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def load_config() -> IndexConfig:
    """The index configuration in force for this process."""
    s = _read_settings()
    split = lambda v: [x for x in re.split(r"\s+", v or "") if x]  # noqa: E731
    cfg = IndexConfig(
        index_url=s.get("index-url") or os.environ.get("UV_DEFAULT_INDEX") or os.environ.get("UV_INDEX_URL") or PYPI,
        extra_index_urls=split(s.get("extra-index-url")) + split(os.environ.get("UV_EXTRA_INDEX_URL")),
        find_links=split(s.get("find-links")),
        no_index=_truthy(s.get("no-index")),
        cert=s.get("cert"), client_cert=s.get("client-cert"),
        trusted_hosts=split(s.get("trusted-host")), proxy=s.get("proxy"))
    for key in ("timeout", "default-timeout"):
        if s.get(key):
            try:
                cfg.timeout = float(s[key])
            except ValueError:
                pass
    return cfg


class _Links(html.parser.HTMLParser):
    """The anchors of a PEP 503 simple page (or a find-links directory listing)."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []  # (text, href)
        self._href: str | None = None
        self._text = ""

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self._href, self._text = dict(attrs).get("href"), ""

    def handle_data(self, data):
        if self._href is not None:
            self._text += data

    def handle_endtag(self, tag):
        if tag == "a" and self._href is not None:
            self.links.append((self._text.strip(), self._href))
            self._href = None


class _Client:
    """urllib with pip's TLS, proxy and credential settings."""

    def __init__(self, cfg: IndexConfig) -> None:
        self.cfg = cfg
        handlers: list[urllib.request.BaseHandler] = []
        if cfg.proxy:
            handlers.append(urllib.request.ProxyHandler({"http": cfg.proxy, "https": cfg.proxy}))
        self._verified = urllib.request.build_opener(*handlers, urllib.request.HTTPSHandler(context=self._tls(True)))
        self._trusting = urllib.request.build_opener(*handlers, urllib.request.HTTPSHandler(context=self._tls(False)))
        self._auth: dict[str, str] = {}  # host -> Authorization, learnt from urls with credentials (as pip does)

    def _tls(self, verify: bool) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        if self.cfg.cert:
            if os.path.isdir(self.cfg.cert):
                ctx.load_verify_locations(capath=self.cfg.cert)
            else:
                ctx.load_verify_locations(cafile=self.cfg.cert)
        if self.cfg.client_cert:
            ctx.load_cert_chain(self.cfg.client_cert)
        if not verify:
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        return ctx

    def open(self, url: str, accept: str = "*/*"):
        """Open ``url`` (credentials in it become basic auth); raises FetchError with the cause."""
        parts = urllib.parse.urlsplit(url)
        headers = {"Accept": accept, "User-Agent": "llamabind-build"}
        netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
        if parts.username:
            cred = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            self._auth[netloc] = "Basic " + base64.b64encode(cred.encode()).decode()
            url = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
        if netloc in self._auth:
            headers["Authorization"] = self._auth[netloc]
        trusted = parts.hostname in self.cfg.trusted_hosts or parts.netloc in self.cfg.trusted_hosts
        opener = self._trusting if trusted else self._verified
        shown = _redact(url)
        for attempt in range(3):
            try:
                return opener.open(urllib.request.Request(url, headers=headers), timeout=self.cfg.timeout)
            except urllib.error.HTTPError as e:
                if e.code < 500 or attempt == 2:
                    raise FetchError(f"the package index answered HTTP {e.code} {e.reason} for {shown}") from None
            except urllib.error.URLError as e:
                reason = e.reason
                if isinstance(reason, ssl.SSLError):
                    raise FetchError(f"TLS failed for {parts.hostname}: {reason} "
                                     f"(set PIP_CERT or pip's 'cert' to your CA bundle)") from None
                if attempt == 2 or isinstance(reason, socket.gaierror) or isinstance(reason, FileNotFoundError):
                    raise FetchError(f"no route to the package index {parts.hostname or shown}: {reason}") from None
            except (TimeoutError, socket.timeout, ConnectionError) as e:
                if attempt == 2:
                    raise FetchError(f"no answer from the package index {parts.hostname} within "
                                     f"{self.cfg.timeout:g} s: {e}") from None
            time.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")


def _redact(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.hostname or "")) if parts.password else url


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _local_path(url_or_path: str) -> Path | None:
    if "://" not in url_or_path:
        return Path(url_or_path)
    parts = urllib.parse.urlsplit(url_or_path)
    return Path(urllib.request.url2pathname(parts.path)) if parts.scheme == "file" else None


def _project_links(client: _Client, index: str, project: str) -> list[tuple[str, str, str | None]]:
    """(filename, absolute url, sha256 or None) for every file the index lists for ``project``."""
    page = index.rstrip("/") + "/" + _normalise(project) + "/"
    local = _local_path(page)
    if local is not None:  # a file:// index: a directory with index.html pages
        if not local.is_dir():
            raise FetchError(f"the package index {index} has no project {project} ({local} does not exist)")
        html_file = local / "index.html"
        body, ctype = (html_file.read_bytes() if html_file.is_file() else b""), "text/html"
        base = html_file.as_uri() if html_file.is_file() else local.as_uri() + "/"
    else:
        try:
            with client.open(page, JSON_ACCEPT) as r:
                body, ctype, base = r.read(), r.headers.get("Content-Type", ""), r.geturl()
        except FetchError as e:
            if " 404 " in str(e):
                raise FetchError(f"the package index {_redact(index)} answered 404: it has no project {project}") from None
            raise
    if "json" in ctype:
        files = json.loads(body).get("files", [])
        return [(f["filename"], urllib.parse.urljoin(base, f["url"]), (f.get("hashes") or {}).get("sha256"))
                for f in files]
    parser = _Links()
    parser.feed(body.decode("utf-8", "replace"))
    out = []
    for text, href in parser.links:
        url, _, frag = urllib.parse.urljoin(base, href).partition("#")
        name = urllib.parse.unquote(url.rsplit("/", 1)[-1]) or text
        out.append((name, url, frag[7:] if frag.startswith("sha256=") else None))
    return out


def _find_link(client: _Client, location: str, filename: str) -> str | None:
    """The url of ``filename`` in a find-links location (a directory, or a page of links)."""
    local = _local_path(location)
    if local is not None:
        if (local / filename).is_file():
            return (local / filename).resolve().as_uri()
        return None
    with client.open(location, "text/html") as r:
        parser = _Links()
        parser.feed(r.read().decode("utf-8", "replace"))
        base = r.geturl()
    for text, href in parser.links:
        url = urllib.parse.urljoin(base, href).partition("#")[0]
        if urllib.parse.unquote(url.rsplit("/", 1)[-1]) == filename:
            return url
    return None


def fetch_file(project: str, filename: str, target: Path, cfg: IndexConfig | None = None) -> str:
    """Find ``filename`` of ``project`` (see ``locate``) and write it to ``target``; returns its url."""
    client = _Client(cfg or load_config())
    url = locate(project, filename, client=client)
    download(url, target, client=client)
    return url


def locate(project: str, filename: str, cfg: IndexConfig | None = None, client: _Client | None = None) -> str:
    """The url of ``filename`` of ``project``: find-links first, then each index in order."""
    client = client or _Client(cfg or load_config())
    cfg = client.cfg
    answers = []
    for loc in cfg.find_links:
        try:
            url = _find_link(client, loc, filename)
        except FetchError as e:
            answers.append(str(e))
            continue
        if url:
            return url
    for index in cfg.indexes:
        try:
            links = _project_links(client, index, project)
        except FetchError as e:
            answers.append(str(e))
            continue
        for name, url, _ in links:
            if name == filename:
                return url
        answers.append(f"{_redact(index)} lists {len(links)} files of {project}, not {filename}")
    if not cfg.indexes and not cfg.find_links:
        answers.append("no index to look in (no-index is set and no find-links)")
    raise FetchError(f"could not find {filename}: " + "; ".join(answers))


def download(url: str, target: Path, cfg: IndexConfig | None = None, client: _Client | None = None) -> Path:
    """Write ``url`` to ``target`` atomically (a temporary file renamed into place)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    local = _local_path(url)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            if local is not None:
                with open(local, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
            else:
                try:
                    with (client or _Client(cfg or load_config())).open(url) as r:
                        shutil.copyfileobj(r, out, 1 << 20)
                except (OSError, TimeoutError) as e:
                    raise FetchError(f"download of {_redact(url)} broke off: {e}") from None
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
