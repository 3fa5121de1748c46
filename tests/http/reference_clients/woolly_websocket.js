class WoollyWebSocket {
  constructor(url = 'ws://localhost:11434/ws') {
    this.url = url;
    this.ws = null;
    this.handlers = new Map();
  }

  connect() {
    return new Promise((resolve, reject) => {
      this.ws = new WebSocket(this.url);
      
      this.ws.onopen = () => {
        console.log('Connected to Woolly');
        resolve();
      };
      
      this.ws.onerror = (error) => {
        console.error('WebSocket error:', error);
        reject(error);
      };
      
      this.ws.onmessage = (event) => {
        const message = JSON.parse(event.data);
        this.handleMessage(message);
      };
    });
  }

  handleMessage(message) {
    switch (message.type) {
      case 'token':
        this.handlers.get(message.request_id)?.onToken?.(message);
        break;
      case 'complete':
        this.handlers.get(message.request_id)?.onComplete?.(message);
        this.handlers.delete(message.request_id);
        break;
      case 'error':
        this.handlers.get(message.request_id)?.onError?.(message);
        this.handlers.delete(message.request_id);
        break;
      case 'status':
        this.onStatus?.(message);
        break;
    }
  }

  generate(prompt, config, handlers) {
    const id = `req-${Date.now()}`;
    this.handlers.set(id, handlers);
    
    this.ws.send(JSON.stringify({
      type: 'generate',
      id,
      prompt,
      config
    }));
    
    return id;
  }

  cancel(requestId) {
    this.ws.send(JSON.stringify({
      type: 'cancel',
      id: requestId
    }));
  }

  close() {
    this.ws?.close();
  }
}

// Usage
const client = new WoollyWebSocket();
await client.connect();

client.generate(
  'Tell me a story',
  { max_tokens: 200, temperature: 0.7 },
  {
    onToken: (msg) => console.log('Token:', msg.token),
    onComplete: (msg) => console.log('Complete:', msg.text),
    onError: (msg) => console.error('Error:', msg.error)
  }
);
