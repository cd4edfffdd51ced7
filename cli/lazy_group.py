"""LazyGroup: a click group whose commands are imported only when one is
run, listed (--help, shell completion) from a table of names and short helps."""

import importlib

import click
from click.shell_completion import CompletionItem


class LazyGroup(click.Group):
    """commands: {name: (module in xknock.cli, attribute, short help)}."""

    def __init__(self, *args, commands, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = dict(commands)

    def list_commands(self, ctx):
        return sorted({*self.lazy, *self.commands})

    def get_command(self, ctx, name):
        if name not in self.commands and name in self.lazy:
            module, attribute, _ = self.lazy[name]
            command = getattr(importlib.import_module(f"xknock.cli.{module}"), attribute)
            self.add_command(command, name)
        return self.commands.get(name)

    def loaded(self):
        """This group with every command imported, in the table's order: for tools
        that read .commands (click-man's pages)."""
        for name in self.lazy:
            self.get_command(None, name)
        self.commands = {**{name: self.commands[name] for name in self.lazy}, **self.commands}   # imported earlier, in another order
        return self

    def listed_help(self, name, limit=45):
        """As click would make it from the command's help, without importing it."""
        if name in self.lazy and name not in self.commands:   # a stand-in of that help, cut by click
            return click.Command(name, help=self.lazy[name][2]).get_short_help_str(limit)
        return self.commands[name].get_short_help_str(limit)

    def format_commands(self, ctx, formatter):
        # click's, with the short helps from the table (every command is listed: none is hidden)
        names = self.list_commands(ctx)
        if names:
            limit = formatter.width - 6 - max(len(name) for name in names)
            with formatter.section("Commands"):
                formatter.write_dl([(name, self.listed_help(name, limit)) for name in names])

    def shell_complete(self, ctx, incomplete):
        # click's, over the table: completing a command's name imports no command
        results = [CompletionItem(name, help=self.listed_help(name)) for name in self.list_commands(ctx)
                   if name.startswith(incomplete)]
        results.extend(click.Command.shell_complete(self, ctx, incomplete))
        return results
