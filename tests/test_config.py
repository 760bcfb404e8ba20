"""The vbremote command's config file: parsing, validation, errors that name the key, passphrase sources."""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vbremote
from vbremote._config import load_config, parse_config

DOCS = Path(__file__).parent.parent / "docs"


def bad(text: str, tmp_path: Path) -> vbremote.ConfigFileError:
    with pytest.raises(vbremote.ConfigFileError) as info:
        parse_config(text, file=tmp_path / "config.toml")
    return info.value


class TestExample:
    def test_documented_example_parses(self):
        """The example config of the docs parses, with each of its repositories and rules."""
        config = load_config(DOCS / "examples" / "config.toml")
        assert config.repository().name == "offsite"
        assert isinstance(config.repositories["offsite"].transport, vbremote.SSHTransport)
        assert isinstance(config.repositories["usb"].transport, vbremote.LocalTransport)
        assert isinstance(config.repositories["jump"].transport, vbremote.CommandTransport)
        assert config.vm("dev").keep == vbremote.KeepRules(daily=14, monthly=6)
        assert config.keep == vbremote.KeepRules(within=timedelta(hours=2), hourly=8, daily=7, weekly=3)
        assert config.keep_labels == {"keep-forever"}
        assert set(config.pings.urls) == {"snapshot", "prune"}
        assert len(config.hooks) == 2

    def test_missing_default_file_is_no_config(self, tmp_path, monkeypatch):
        """Without --config, a missing file at the XDG location means defaults only."""
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
        config = load_config()
        assert config.repositories == {}
        assert config.file is None

    def test_xdg_location(self, tmp_path, monkeypatch):
        """The default file is $XDG_CONFIG_HOME/vbremote/config.toml."""
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
        (tmp_path / "vbremote").mkdir()
        (tmp_path / "vbremote" / "config.toml").write_text('[repositories.a]\npath = "r"\n')
        assert load_config().repository().transport.location == str(tmp_path / "vbremote" / "r")

    def test_missing_named_file_refused(self, tmp_path):
        """A --config file that does not exist is an error naming it."""
        with pytest.raises(vbremote.ConfigFileError, match="does not exist") as info:
            load_config(tmp_path / "nope.toml")
        assert info.value.file == str(tmp_path / "nope.toml")


class TestErrorsNameTheKey:
    def test_literal_passphrase_refused(self, tmp_path):
        """A passphrase written in the config is refused, pointing to the three sources."""
        error = bad('[repositories.main]\npath = "r"\npassphrase = "hunter2"\n', tmp_path)
        assert error.key == "repositories.main.passphrase"
        assert "passphrase_command" in str(error)
        assert "hunter2" not in str(error)

    @pytest.mark.parametrize(
        ("text", "key"),
        [
            ('colour = "red"\n', "colour"),
            ('[repositories.main]\npath = "r"\npaht = "x"\n', "repositories.main.paht"),
            ('[repositories.main]\npath = 3\n', "repositories.main.path"),
            ('[repositories.main]\ntransport = "ftp"\npath = "r"\n', "repositories.main.transport"),
            ('[repositories.main]\npath = "r"\nhost = "h"\n', "repositories.main.host"),
            ('[repositories.main]\ntransport = "ssh"\nhost = "h"\n', "repositories.main.path"),
            ('[repositories.main]\ntransport = "ssh"\nhost = "h"\npath = "p"\nport = 70000\n',
             "repositories.main.port"),
            ('[repositories.main]\ntransport = "ssh"\nhost = "h"\npath = "p"\nport = true\n',
             "repositories.main.port"),
            ('[repositories.main]\npath = "r"\npassphrase_env = "A"\npassphrase_file = "f"\n',
             "repositories.main.passphrase_file"),
            ('[repositories.main]\npath = "r"\nencryption = "rot13"\n', "repositories.main.encryption"),
            ('default_repository = "other"\n[repositories.main]\npath = "r"\n', "default_repository"),
            ('[vms.dev]\nmode = "sideways"\n', "vms.dev.mode"),
            ('[vms.dev.keep]\nwithin = "2 days"\n', "vms.dev.keep.within"),
            ('[vms.dev.keep]\ndaily = -1\n', "vms.dev.keep.daily"),
            ('[keep]\nlast = 1\nsecondly = 2\n', "keep"),
            ('[keep]\nfortnightly = 2\n', "keep.fortnightly"),
            ('[[hooks]]\ncommand = "x"\nevents = ["explode"]\n', "hooks[0].events"),
            ('[[hooks]]\nevents = ["start"]\n', "hooks[0].command"),
            ('[[hooks]]\ncommand = "x"\non = ["dance"]\n', "hooks[0].on"),
            ('[pings]\nsnapshot = "ftp://x/y"\n', "pings.snapshot"),
            ('[pings]\nbackup = "https://x/y"\n', "pings.backup"),
            ('[virtualbox]\nbackend = "simulated"\n', "virtualbox.home"),
            ('[virtualbox]\nhome = "h"\n', "virtualbox.home"),
            ('[virtualbox]\nbackend = "qemu"\n', "virtualbox.backend"),
        ],
    )
    def test_bad_value_names_key(self, tmp_path, text, key):
        """Each bad or unknown value raises ConfigFileError naming its dotted key and the file."""
        error = bad(text, tmp_path)
        assert error.key == key
        assert key in str(error)
        assert error.file == str(tmp_path / "config.toml")
        assert isinstance(error, vbremote.ConfigurationError)

    def test_not_toml(self, tmp_path):
        """Text that is not TOML is refused with the parser's position."""
        error = bad("[repositories\n", tmp_path)
        assert "not valid TOML" in str(error)

    def test_no_repository(self, tmp_path):
        """Asking for the repository of a config without one says how to add one."""
        config = parse_config("", file=tmp_path / "c.toml")
        with pytest.raises(vbremote.ConfigFileError, match=r"\[repositories.NAME\]"):
            config.repository()

    def test_several_without_default(self, tmp_path):
        """Two repositories and no default: the error asks for default_repository or --repo."""
        config = parse_config('[repositories.a]\npath = "a"\n[repositories.b]\npath = "b"\n', file=tmp_path / "c")
        with pytest.raises(vbremote.ConfigFileError, match="--repo") as info:
            config.repository()
        assert info.value.key == "default_repository"
        assert config.repository("b").name == "b"

    def test_no_retention_rules(self, tmp_path):
        """A prune without rules for the VM names the missing keep table."""
        config = parse_config("", file=tmp_path / "c.toml")
        with pytest.raises(vbremote.ConfigFileError, match=r"\[keep\]"):
            config.policy("dev")


class TestValues:
    def test_ssh_transport(self, tmp_path):
        """An ssh repository becomes an SSHTransport with every field; relative identity paths resolve."""
        config = parse_config(
            '[repositories.s]\ntransport = "ssh"\nhost = "store"\nuser = "borg"\nport = 2222\n'
            'identity = "keys/id"\npath = "/srv/r"\nremote_borg = "borg-1.4"\nupload_ratelimit = 500\n'
            'append_only = true\nssh_options = ["StrictHostKeyChecking=accept-new"]\n',
            file=tmp_path / "config.toml",
        )
        transport = config.repository().transport
        assert isinstance(transport, vbremote.SSHTransport)
        assert transport.location == "ssh://borg@store:2222/srv/r"
        assert transport.identity_file == tmp_path / "keys" / "id"
        assert transport.remote_borg == "borg-1.4"
        assert transport.upload_ratelimit == 500
        assert transport.append_only is True
        assert transport.ssh_options == ("StrictHostKeyChecking=accept-new",)

    def test_local_path_relative_to_file(self, tmp_path):
        """A local repository's relative path is relative to the config file's folder."""
        config = parse_config('[repositories.l]\npath = "repo"\n', file=tmp_path / "sub" / "config.toml")
        assert config.repository().transport.location == str(tmp_path / "sub" / "repo")

    def test_within_units(self, tmp_path):
        """keep.within takes borg's interval units."""
        for text, value in (("90M", timedelta(minutes=90)), ("2H", timedelta(hours=2)), ("3d", timedelta(days=3)),
                            ("1w", timedelta(weeks=1)), ("1m", timedelta(days=31)), ("1y", timedelta(days=365))):
            config = parse_config(f'[keep]\nwithin = "{text}"\n', file=tmp_path / "c.toml")
            assert config.keep is not None
            assert config.keep.within == value

    def test_policy_union_with_labels(self, tmp_path):
        """A VM's policy is its rules, else the default rules, with the kept labels."""
        config = parse_config(
            'keep_labels = ["gold"]\n[keep]\nlast = 2\n'
            '[vms.dev]\nkeep_labels = ["silver"]\n[vms.dev.keep]\ndaily = 3\n',
            file=tmp_path / "c.toml",
        )
        assert config.policy("other") == vbremote.KeepRules(last=2) | vbremote.KeepLabels({"gold"})
        assert config.policy("dev") == vbremote.KeepRules(daily=3) | vbremote.KeepLabels({"gold", "silver"})


class TestPassphrase:
    def config(self, tmp_path: Path, line: str) -> vbremote._config.RepositoryConfig:
        return parse_config(f'[repositories.m]\npath = "r"\n{line}\n', file=tmp_path / "c.toml").repository()

    def test_from_command(self, tmp_path):
        """passphrase_command's output (without its newline) is the passphrase, asked only when called."""
        script = tmp_path / "pw.py"
        script.write_text("print('s3cret')\n")
        repo = self.config(tmp_path, f"passphrase_command = [{sys.executable!r}, {str(script)!r}]")
        source = repo.passphrase()
        assert source is not None
        assert source() == "s3cret"

    def test_failing_command(self, tmp_path):
        """A failing passphrase_command raises PassphraseMissing with its exit code and last words."""
        repo = self.config(tmp_path, f"passphrase_command = [{sys.executable!r}, '-c', 'import sys; sys.exit(\"no\")']")
        source = repo.passphrase()
        assert source is not None
        with pytest.raises(vbremote.PassphraseMissing, match="exit code 1: no"):
            source()

    def test_from_env(self, tmp_path, monkeypatch):
        """passphrase_env reads the variable when the repository is opened, and names it when unset."""
        repo = self.config(tmp_path, 'passphrase_env = "VBR_TEST_PW"')
        source = repo.passphrase()
        assert source is not None
        monkeypatch.delenv("VBR_TEST_PW", raising=False)
        with pytest.raises(vbremote.PassphraseMissing, match="VBR_TEST_PW"):
            source()
        monkeypatch.setenv("VBR_TEST_PW", "from env")
        assert source() == "from env"

    def test_from_file(self, tmp_path):
        """passphrase_file's first line is the passphrase; an unreadable file is PassphraseMissing."""
        repo = self.config(tmp_path, 'passphrase_file = "pw.txt"')
        source = repo.passphrase()
        assert source is not None
        with pytest.raises(vbremote.PassphraseMissing, match=r"pw\.txt"):
            source()
        (tmp_path / "pw.txt").write_text("in a file\n")
        assert source() == "in a file"

    def test_no_source(self, tmp_path):
        """Without a source, borg's own variables apply (no callable)."""
        assert self.config(tmp_path, "").passphrase() is None


_keys = st.sampled_from(
    ["repositories", "main", "path", "transport", "host", "port", "keep", "daily", "within", "vms", "mode",
     "hooks", "command", "events", "pings", "check", "virtualbox", "backend", "home", "passphrase_env", "x"]
)
_scalars = st.one_of(
    st.integers(-5, 70000), st.booleans(), st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["ssh", "local", "command", "simulated", "2d", "https://h/p", "", "a b"]),
)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=4),
                       max_leaves=12)


class TestProperties:
    @settings(max_examples=300, deadline=None)
    @given(st.dictionaries(_keys, _values, max_size=5))
    def test_any_document_parses_or_names_a_key(self, document):
        """Any TOML document either validates or raises ConfigFileError; nothing else escapes."""
        text = "".join(f"{key} = {_toml_value(value)}\n" for key, value in document.items())
        try:
            config = parse_config(text, file="c.toml")
        except vbremote.ConfigFileError as exc:
            message, key = str(exc), exc.key
        else:
            message, key = "", ""
            assert config.file == Path("c.toml")
        assert not key or key in message
