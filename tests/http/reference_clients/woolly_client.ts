interface GenerateOptions {
  maxTokens?: number;
  temperature?: number;
  topP?: number;
  topK?: number;
  repeatPenalty?: number;
  stream?: boolean;
}

class WoollyClient {
  constructor(private baseUrl = 'http://localhost:11434') {}

  async generate(prompt: string, options: GenerateOptions = {}): Promise<string> {
    const response = await fetch(`${this.baseUrl}/api/generate`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({
        prompt,
        max_tokens: options.maxTokens ?? 200,
        temperature: options.temperature ?? 0.7,
        top_p: options.topP ?? 0.9,
        stream: false
      })
    });

    if (!response.ok) {
      throw new Error(`HTTP error! status: ${response.status}`);
    }

    const data = await response.json();
    return data.text;
  }

  async *generateStream(
    prompt: string, 
    options: GenerateOptions = {}
  ): AsyncGenerator<string> {
    const response = await fetch(`${this.baseUrl}/api/generate`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({
        prompt,
        max_tokens: options.maxTokens ?? 200,
        temperature: options.temperature ?? 0.7,
        stream: true
      })
    });

    if (!response.ok) {
      throw new Error(`HTTP error! status: ${response.status}`);
    }

    const reader = response.body!.getReader();
    const decoder = new TextDecoder();

    while (true) {
      const { done, value } = await reader.read();
      if (done) break;

      const chunk = decoder.decode(value);
      const lines = chunk.split('\n');

      for (const line of lines) {
        if (line.startsWith('data: ')) {
          const data = line.slice(6);
          if (data === '[DONE]') return;
          
          try {
            const json = JSON.parse(data);
            yield json.token;
          } catch (e) {
            console.error('Failed to parse:', data);
          }
        }
      }
    }
  }
}

// Usage
const client = new WoollyClient();

// Non-streaming
const text = await client.generate('Once upon a time');
console.log(text);

// Streaming
for await (const token of client.generateStream('Tell me a story')) {
  process.stdout.write(token);
}
