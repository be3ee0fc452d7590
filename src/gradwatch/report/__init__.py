"""Reports: the terminal (rich) and, later, offline HTML."""
