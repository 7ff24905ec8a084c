from daedalus.cli import app

app()
