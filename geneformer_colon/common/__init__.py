"""Small modules every layer shares: errors, files, names, tables, figures, the console, CPUs."""
