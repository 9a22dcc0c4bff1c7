"""For workers that take several runs in one launch: OUT FLAGS... [--then OUT FLAGS...]...
(the workers' own directory is first on sys.path when torchrun starts them)."""


def runs(argv: list[str]) -> list[tuple[str, list[str]]]:
    """[(OUT, FLAGS)] in order: each --then starts another run in the same processes."""
    groups, current = [], []
    for arg in argv + ["--then"]:
        if arg == "--then":
            groups.append((current[0], current[1:]))
            current = []
        else:
            current.append(arg)
    return groups
