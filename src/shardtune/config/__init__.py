"""The run's configuration: schema.py (the llama-recipes config dataclasses, their help, and
the registries of PEFT methods and datasets), parse.py (flags and YAML), validate.py (every
check that needs no model or data). Import-light: `--help` needs nothing else."""
