"""The README's config reference covers every field, and its two commands exist."""
from conftest import REPO
from shardtune.config.schema import ALL_CONFIGS


def _config_table_rows(readme: str) -> dict[str, str]:
    """'config.field' -> its default cell, from every table row of the config reference: rows
    under a config's own heading (| field | default | ...) and rows that name their config
    (| config | field | default | ...). A row may list several fields and their defaults
    (`train_split, test_split | train, val`)."""
    configs = {cls.__name__ for cls in ALL_CONFIGS}
    rows, heading = {}, None
    for line in readme.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if not line.startswith("|"):
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[0] in configs:
            config, names, defaults = cells[:3]
        elif heading in configs and len(cells) >= 2:
            config, names, defaults = heading, cells[0], cells[1]
        else:
            continue
        names = names.split(", ")
        values = defaults.split(", ") if len(names) > 1 else [defaults]
        rows.update({f"{config}.{name}": value for name, value in zip(names, values)})
    return rows


def test_config_tables_list_every_field_with_its_default():
    from dataclasses import fields

    from shardtune.config.parse import shown_default

    rows = _config_table_rows((REPO / "README.md").read_text())
    for cls in ALL_CONFIGS:
        for f in fields(cls):
            key = f"{cls.__name__}.{f.name}"
            assert key in rows, f"README.md's config tables have no row for {key}"
            default, cell = shown_default(f), rows[key]
            if f.type in ("int", "float"):  # 1e-4 is 0.0001
                assert float(cell.split()[0]) == float(default), (key, cell, default)
            else:
                assert cell == default or cell.startswith(default + " "), (key, cell, default)


def test_readme_commands_are_make_targets():
    readme, makefile = (REPO / "README.md").read_text(), (REPO / "Makefile").read_text()
    for target in ("demo", "test"):
        assert f"make {target}" in readme and f"\n{target}:" in makefile
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_tested_versions_table_matches_the_lock():
    """The README's Tested versions table says what constraints.txt installs."""
    lock = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    readme = (REPO / "README.md").read_text()
    table = readme.split("## Tested versions", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| ")]
    listed = {name: version for name, version in rows[1:]}
    assert {"torch", "transformers", "peft"} <= listed.keys()
    assert {name: lock.get(name) for name in listed} == listed
