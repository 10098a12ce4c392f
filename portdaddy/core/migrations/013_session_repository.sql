-- The repository a session's claims are relative to (core/repository.py): claims conflict only within one
-- repository. NULL (sessions from before, or callers that name no worktree) meets every repository's claims.
ALTER TABLE sessions ADD COLUMN repository TEXT;
