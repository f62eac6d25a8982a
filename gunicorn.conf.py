"""gunicorn's settings for incidents; gunicorn reads this file from the directory it starts in.

    gunicorn -w 4 -b 127.0.0.1:8000 'incidents:create_app()'

Threads let each worker's writer share one COMMIT among the requests that wait for it (group
commit); sync workers write one request a transaction. The app is loaded once in the master, which
migrates the database before the workers fork; each worker then opens its own connections, lock
files and writer thread, and runs the clock that the master hands over at the fork.
"""
worker_class = "gthread"
threads = 8
preload_app = True
