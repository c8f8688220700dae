-- wrk script: GET /api/v1/stream?movie_id=inception with a bearer token (TOKEN from the environment).
wrk.method = "GET"
wrk.path = "/api/v1/stream?movie_id=inception"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("TOKEN")
