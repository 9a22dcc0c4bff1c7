"""The README's config reference covers every field, and its two commands exist."""
from conftest import REPO
from shardtune.configs import ALL_CONFIGS, field_names


def test_every_config_field_is_documented():
    readme = (REPO / "README.md").read_text()
    missing = [f"{cls.__name__}.{name}" for cls in ALL_CONFIGS for name in field_names(cls)
               if name not in readme]
    assert not missing, f"README.md does not document: {missing}"


def test_readme_commands_are_make_targets():
    readme, makefile = (REPO / "README.md").read_text(), (REPO / "Makefile").read_text()
    for target in ("demo", "test"):
        assert f"make {target}" in readme and f"\n{target}:" in makefile
    assert "make test" in (REPO / ".ci" / "run").read_text()
