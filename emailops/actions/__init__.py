"""What an operator does to mail, one function per action: the command line and the console call
the same function, and each change is written with its audit entry in one transaction."""
