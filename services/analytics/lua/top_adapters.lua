-- TopAdapters, inside Redis, so that 10,000 adapters' sums never cross the wire
-- (services/analytics/core.py calls it; docs/analytics.md explains).
--
-- KEYS: the window's rank hashes, one per bucket ("<adapter>" -> rank record).
-- ARGV[1]: the metric: requests, success_rate, tokens_per_second, avg_rating (highest
-- first) or p95_latency (lowest first); ARGV[2]: limit; ARGV[3]: min_requests;
-- ARGV[4]: how many doubles of a rank record are sums (ingest.RANK_STATS: n, ok, ct, ls,
-- rn, rs) before its coarse latency histogram; ARGV[5]: how many coarse bins that has
-- (ingest.COARSE_EDGES); ARGV[5 + k]: the prefix ("...:s:") of bucket k's sketch hashes
-- (p95_latency only).
--
-- Returns [adapter, value, requests, ...], best first; for p95_latency the value is the
-- p95's sketch bin ("z": the zero bin). Ties go to more requests, then to the adapter name
-- first in byte order.
local metric, limit, minreq = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local NR, NC = tonumber(ARGV[4]), tonumber(ARGV[5])
local higher = metric ~= 'p95_latency'
local byte, min, floor, insert = string.byte, math.min, math.floor, table.insert
local sunpack, tonum, call, find, sub = struct.unpack, tonumber, redis.call, string.find, string.sub

-- Names in byte order, whatever locale the server's strcoll follows (so not Lua's `<` on
-- strings), 8 bytes per string.byte call: with many ties this comparison is most of the work.
local function before(a, b)
  if a == b then return false end
  for i = 1, min(#a, #b), 8 do
    local a1, a2, a3, a4, a5, a6, a7, a8 = byte(a, i, i + 7)
    local b1, b2, b3, b4, b5, b6, b7, b8 = byte(b, i, i + 7)
    if a1 ~= b1 then return (a1 or -1) < (b1 or -1) end
    if a2 ~= b2 then return (a2 or -1) < (b2 or -1) end
    if a3 ~= b3 then return (a3 or -1) < (b3 or -1) end
    if a4 ~= b4 then return (a4 or -1) < (b4 or -1) end
    if a5 ~= b5 then return (a5 or -1) < (b5 or -1) end
    if a6 ~= b6 then return (a6 or -1) < (b6 or -1) end
    if a7 ~= b7 then return (a7 or -1) < (b7 or -1) end
    if a8 ~= b8 then return (a8 or -1) < (b8 or -1) end
  end
  return #a < #b
end

-- The best `limit` rows {adapter, value, requests}, kept sorted: most rows take one
-- comparison with the worst kept, and none allocates anything unless it is kept.
local top = {}
local function better(a, v, req, row)
  if v ~= row[2] then
    if higher then return v > row[2] end
    return v < row[2]
  end
  if req ~= row[3] then return req > row[3] end
  return before(a, row[1])
end
local function offer(a, v, req)
  local n = #top
  if n == limit and not better(a, v, req, top[n]) then return end
  local lo, hi = 1, n + 1
  while lo < hi do
    local mid = floor((lo + hi) / 2)
    if better(a, v, req, top[mid]) then hi = mid else lo = mid + 1 end
  end
  insert(top, lo, {a, v, req})
  if #top > limit then top[#top] = nil end
end

-- Metrics of the rank records' sums: only the leading doubles a metric needs are unpacked.
-- (Both metrics' loops run at the chunk's top level, so the names they use per adapter are
-- locals of the chunk rather than upvalues of a function.)
if higher then
  local N, X, Y = {}, {}, {}
  for k = 1, #KEYS do
    local flat = call('HGETALL', KEYS[k])
    if metric == 'requests' then
      for j = 1, #flat, 2 do
        local a = flat[j]
        N[a] = (N[a] or 0) + sunpack('<d', flat[j + 1])
      end
    elseif metric == 'success_rate' then
      for j = 1, #flat, 2 do
        local a = flat[j]
        local n, ok = sunpack('<dd', flat[j + 1])
        N[a], X[a] = (N[a] or 0) + n, (X[a] or 0) + ok
      end
    elseif metric == 'tokens_per_second' then
      for j = 1, #flat, 2 do
        local a = flat[j]
        local n, _, ct, ls = sunpack('<dddd', flat[j + 1])
        N[a], X[a], Y[a] = (N[a] or 0) + n, (X[a] or 0) + ct, (Y[a] or 0) + ls
      end
    else  -- avg_rating
      for j = 1, #flat, 2 do
        local a = flat[j]
        local n, _, _, _, rn, rs = sunpack('<dddddd', flat[j + 1])
        N[a], X[a], Y[a] = (N[a] or 0) + n, (X[a] or 0) + rn, (Y[a] or 0) + rs
      end
    end
  end
  for a, req in pairs(N) do
    if req >= minreq then
      local v
      if metric == 'requests' then
        if req > 0 then v = req end
      elseif metric == 'success_rate' then
        if req > 0 then v = X[a] / req end
      elseif metric == 'tokens_per_second' then
        if req > 0 then
          v = 0
          if Y[a] > 0 then v = X[a] / Y[a] end
        end
      elseif X[a] > 0 then  -- avg_rating: only adapters with ratings
        v = Y[a] / X[a]
      end
      if v then offer(a, v, req) end
    end
  end
  local out = {}
  for _, r in ipairs(top) do
    out[#out + 1] = r[1]
    out[#out + 1] = string.format('%.17g', r[2])
    out[#out + 1] = r[3]
  end
  return out
end

-- p95_latency: each adapter's sketch merged over its series and the window's buckets it
-- has requests in, and its exact sketch p95 (the bin of rank floor(0.95 (n - 1)), as
-- LatencySketch.quantile). The sketch hashes are named from the prefixes and the adapter
-- names in the rank hashes (the tenant's own keys: same hash tag, same cluster slot).
-- Pruning, exact: the coarse histograms in the rank records say in which coarse bin each
-- adapter's p95 lies (coarse bins are runs of sketch bins, so the rank walk over coarse
-- counts stops in the coarse bin that holds the sketch p95). Adapters are read coarse bin
-- by coarse bin, lowest first, and reading stops once the top is full after a coarse bin:
-- every adapter left has its p95 in a higher coarse bin, above every p95 read so far, so
-- it can neither enter nor tie.
local coarse_fmt = '<' .. string.rep('x', 8 * NR) .. string.rep('d', NC)
-- The coarse bin (1..NC) that holds the p95 of n requests with these coarse counts: a
-- tail-recursive walk over the counts as arguments, which allocates nothing.
local function walk(rank, seen, i, c, ...)
  seen = seen + c
  if seen > rank or i == NC then return i end
  return walk(rank, seen, i + 1, ...)
end
local function coarse_bin(n, ...)
  return walk(floor(0.95 * (n - 1)), 0, 1, ...)
end
local ZERO = -1e9
local function bin_of(f)  -- "<version>|<experiment>|<variant>|<bin>" -> bin
  local s = sub(f, find(f, '|[^|]*$') + 1)
  if s == 'z' then return ZERO end
  return tonum(s)
end
-- The adapter's (bin, count) pairs, in bs/cs[1..n] (reused): a few are sorted in place,
-- many are merged in a table and sorted by table.sort. Equal bins may stay apart: the walk
-- to the rank reaches the same bin either way.
local bs, cs = {}, {}
local function p95_bin(n, total)
  if n <= 24 then
    for i = 2, n do
      local b, c, j = bs[i], cs[i], i - 1
      while j > 0 and bs[j] > b do
        bs[j + 1], cs[j + 1] = bs[j], cs[j]
        j = j - 1
      end
      bs[j + 1], cs[j + 1] = b, c
    end
  else
    local counts, bins = {}, {}
    for i = 1, n do
      local b = bs[i]
      if counts[b] then
        counts[b] = counts[b] + cs[i]
      else
        counts[b] = cs[i]
        bins[#bins + 1] = b
      end
    end
    table.sort(bins)
    n = #bins
    for i = 1, n do bs[i], cs[i] = bins[i], counts[bins[i]] end
  end
  local rank, seen = floor(0.95 * (total - 1)), 0
  for i = 1, n do
    seen = seen + cs[i]
    if seen > rank then return bs[i] end
  end
end
do  -- p95_latency (the other metrics returned above)
  -- N[a]: requests; active[a]: the bucket it has requests in, or a list of them;
  -- R[a]: its rank record while there is one, then its summed coarse counts.
  local N, active, R = {}, {}, {}
  for k = 1, #KEYS do
    local flat = call('HGETALL', KEYS[k])
    for j = 1, #flat, 2 do
      local a, rec = flat[j], flat[j + 1]
      local n = sunpack('<d', rec)
      if n > 0 then
        local b = active[a]
        if not b then
          active[a] = k
        elseif type(b) == 'number' then
          active[a] = {b, k}
        else
          b[#b + 1] = k
        end
        N[a] = (N[a] or 0) + n
        local have = R[a]
        if have == nil then
          R[a] = rec
        else
          if type(have) == 'string' then have = {sunpack(coarse_fmt, have)} end
          local add = {sunpack(coarse_fmt, rec)}
          for i = 1, NC do have[i] = have[i] + add[i] end
          R[a] = have
        end
      end
    end
  end
  local groups = {}
  for g = 1, NC do groups[g] = {} end
  for a, req in pairs(N) do
    if req >= minreq then
      local have, g = R[a], nil
      if type(have) == 'string' then
        g = coarse_bin(req, sunpack(coarse_fmt, have))
      else
        g = coarse_bin(req, unpack(have, 1, NC))
      end
      local list = groups[g]
      list[#list + 1] = a
    end
  end
  for g = 1, NC do
    for _, a in ipairs(groups[g]) do
      local buckets = active[a]
      if type(buckets) == 'number' then buckets = {buckets} end
      local n, total = 0, 0
      for b = 1, #buckets do
        local flat = call('HGETALL', ARGV[buckets[b] + 5] .. a)
        for j = 1, #flat, 2 do
          local c = tonum(flat[j + 1])
          n, total = n + 1, total + c
          bs[n], cs[n] = bin_of(flat[j]), c
        end
      end
      if total > 0 then offer(a, p95_bin(n, total), N[a]) end
    end
    if #top == limit then break end
  end
  local out = {}
  for _, r in ipairs(top) do
    out[#out + 1] = r[1]
    out[#out + 1] = r[2] == ZERO and 'z' or string.format('%d', r[2])
    out[#out + 1] = r[3]
  end
  return out
end
