"""`loraforge webui`: the whole workflow in a browser (FastAPI + one static page, no CDN assets).

    server:  app.py (routes), pages.py (Data page and job routes), forms.py (the config form), jobs.py (train /
             predict / eval / export as detached processes, runner.py), chat.py (base and adapter engines),
             clicall.py (the `loraforge data` handlers run in-process)
    page:    static/index.html, app.js (shell, config form, Train), pages.js (Data, Evaluate, Chat, Export),
             i18n.js (English / Chinese), style.css
"""
