"""The `mta` command line: `mta demo` (more subcommands come with the conversion tools)."""
