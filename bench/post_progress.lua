-- wrk script: POST /api/v1/stream/progress with a bearer token (TOKEN from the environment).
wrk.method = "POST"
wrk.path = "/api/v1/stream/progress"
wrk.body = '{"movie_id":"inception","position_seconds":2843,"device_id":"tv-living-room"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("TOKEN")
