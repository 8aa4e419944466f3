"""`alignkit console`: the whole path in one browser page, a face on the library (`alignkit.api`).

`workspace` keeps the console inside its folders and its runs on disk; `jobs` runs training, evaluation and
export one at a time on a worker thread through the library, with the runs' events as they happen; `forms`
builds each stage's form from its config class; `models` says what a model is; `chat` answers with streamed
tokens and stores votes in the feedback store `serve --log-db` uses; `app` is the FastAPI app and its routes;
`static/` is the page (no CDN: every asset ships in the package).
"""
